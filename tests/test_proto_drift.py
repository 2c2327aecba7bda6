"""The committed stubs are exactly what the generator makes from the .proto."""

from pathlib import Path

from lbgm.cli.protogen import generate, proto_root

GENERATED = ["lbgm_pb2.py", "lbgm_pb2.pyi", "lbgm_pb2_grpc.py"]


def test_committed_stubs_match_the_proto(tmp_path):
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "lbgm" / "v1" / name).read_text()
        committed = (proto_root() / "lbgm" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `python -m lbgm.cli.protogen`"


def test_proto_package_is_versioned():
    text = (proto_root() / "lbgm" / "v1" / "lbgm.proto").read_text()
    assert "package lbgm.v1;" in text
    fields = [line.split("//")[0].strip() for line in text.splitlines()]
    float_lists = [field for field in fields if field.startswith(("repeated float", "repeated double"))]
    assert set(float_lists) == {"repeated float rhos = 2;"}  # tensors never travel as float lists, only scalars
