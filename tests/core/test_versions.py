"""Every saved folder refuses a newer schema version with the same clear message."""

from __future__ import annotations

import json

import pytest

from lm_probe import ActivationStore, Geometry, ProbeRunner
from lm_probe.consumers.geometry_results import SCHEMA_VERSION as GEOMETRY_SCHEMA
from lm_probe.consumers.store import SCHEMA_VERSION as STORE_SCHEMA, StoredRun
from lm_probe.core.versions import check_schema_version
from lm_probe.probes.persist import SCHEMA_VERSION as PROBE_SCHEMA

# (kind, the file each reader opens first, the newest version it reads, reader)
READERS = [("probe", "probes.json", PROBE_SCHEMA, ProbeRunner.load),
           ("geometry", "metadata.json", GEOMETRY_SCHEMA, Geometry.load),
           ("store", "metadata.json", STORE_SCHEMA, StoredRun.open)]  # the old format's manifest


@pytest.mark.parametrize("kind, filename, supported, read", READERS, ids=[r[0] for r in READERS])
def test_a_newer_schema_is_refused_before_anything_else_is_read(tmp_path, kind, filename, supported, read):
    (tmp_path / filename).write_text(json.dumps({"schema_version": supported + 1}))
    message = (f"{tmp_path} was written with {kind} schema {supported + 1}; this lm_probe reads up to {supported}: "
               "upgrade lm_probe to read it")
    with pytest.raises(ValueError) as err:
        read(tmp_path)
    assert str(err.value) == message


def test_older_and_unversioned_documents_pass():
    for document in ({"schema_version": 1}, {"schema_version": 0}, {}):
        check_schema_version(document, 1, "probe", "somewhere")
    with pytest.raises(ValueError, match="somewhere was written with store schema 3; this lm_probe reads up to 2"):
        check_schema_version({"schema_version": 3}, 2, "store", "somewhere")


def test_the_store_opens_its_run_through_the_same_check(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metadata.json").write_text(json.dumps({"schema_version": STORE_SCHEMA + 1}))
    with pytest.raises(ValueError, match=f"store schema {STORE_SCHEMA + 1}.*upgrade lm_probe"):
        ActivationStore.open(tmp_path).run("run")


def test_an_arrow_run_of_a_newer_schema_is_refused(tmp_path):
    """An Arrow run keeps its metadata in dataset_info.json's description."""
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": []}))
    info = {"description": json.dumps({"schema_version": STORE_SCHEMA + 1}), "features": {}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"store schema {STORE_SCHEMA + 1}; this lm_probe reads up to {STORE_SCHEMA}"):
        StoredRun(tmp_path)
