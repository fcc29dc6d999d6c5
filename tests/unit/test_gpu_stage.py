"""The GPU staging (loadgen.gpu.stage) without downloads: fatbin trimming on a made-up ELF,
the vsite archive from a made-up wheel, parcels that fit a call and unpack in order."""

from __future__ import annotations

import json
import re
import struct
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from loadgen.gpu.stage import (
    FATBIN_MAGIC,
    Archive,
    blank_foreign_cubins,
    build_vsite,
    elf_section,
    environment,
    make_parcels,
    trim_library,
    unpack,
)

ROOT = Path(__file__).resolve().parents[2]
CUBIN_80, CUBIN_90, PTX_80 = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 16


def fatbin() -> bytes:
    def entry(kind: int, sm: int, payload: bytes) -> bytes:
        header = bytearray(64)
        struct.pack_into("<HHII", header, 0, kind, 1, 64, len(payload))
        struct.pack_into("<I", header, 28, sm)
        return bytes(header) + payload

    body = entry(2, 80, CUBIN_80) + entry(2, 90, CUBIN_90) + entry(1, 80, PTX_80)
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with_fatbin() -> bytes:
    """A 64-bit little-endian ELF with sections: null, .nv_fatbin, .shstrtab."""
    strings = b"\0.nv_fatbin\0.shstrtab\0"
    content = fatbin()
    data_at = 64
    strings_at = data_at + len(content)
    shoff = strings_at + len(strings)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)

    def section(name_at: int, offset: int, size: int) -> bytes:
        row = bytearray(64)
        struct.pack_into("<I", row, 0, name_at)
        struct.pack_into("<QQ", row, 0x18, offset, size)
        return bytes(row)

    sections = (section(0, 0, 0) + section(1, data_at, len(content))
                + section(12, strings_at, len(strings)))
    return bytes(header) + content + strings + sections


def test_elf_section_is_found_and_foreign_cubins_are_zeroed(tmp_path: Path) -> None:
    data = bytearray(elf_with_fatbin())
    offset, size = elf_section(data, ".nv_fatbin") or (0, 0)
    assert data[offset:offset + 4] == struct.pack("<I", FATBIN_MAGIC)
    assert elf_section(data, ".text") is None
    assert blank_foreign_cubins(data, offset, size) == (32, 48)
    assert CUBIN_80 not in data and CUBIN_90 in data and PTX_80 in data
    library = tmp_path / "lib.so"
    library.write_bytes(elf_with_fatbin())
    assert trim_library(library) == (32, 48)
    assert bytes(32) in library.read_bytes() and CUBIN_90 in library.read_bytes()
    with pytest.raises(ValueError, match="ELF"):
        elf_section(b"not an elf at all", ".nv_fatbin")


def fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("vllm/__init__.py", "__version__ = '0.25.0'\n")
        wheel.writestr("vllm/vllm-rs/vllm-rs", "binary")
        wheel.writestr("vllm/third_party/deep_gemm/__init__.py", "")
        wheel.writestr("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "fa2")
        wheel.writestr("vllm/_moe_C_stable_libtorch.abi3.so", elf_with_fatbin())
        wheel.writestr("vllm/_C_stable_libtorch.abi3.so", elf_with_fatbin())
    return path


def test_vsite_archive_drops_and_trims(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    out = build_vsite(fake_wheel(tmp_path / "vllm-0.25.0-cp38-abi3-x.whl"), wheels,
                      tmp_path / "stage" / "vsite.tar.xz", tmp_path / "work", xz_threads=1)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        library = tar.extractfile("vsite/vllm/_C_stable_libtorch.abi3.so")
        assert library is not None
        data = library.read()
    assert "vsite/vllm/__init__.py" in names
    assert "vsite/vllm/_moe_C_stable_libtorch.abi3.so" in names  # kept by default
    assert not any("vllm-rs" in n or "deep_gemm" in n or "fa2" in n for n in names)
    assert CUBIN_80 not in data and CUBIN_90 in data
    assert not (tmp_path / "work").exists()


def test_a_parcel_must_leave_room(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.xz"
    archive.write_bytes(b"x")
    with pytest.raises(ValueError, match="too small"):
        make_parcels([Archive("a.tar.xz", archive, "vsite")], tmp_path / "stage", 1000)


def test_unpack_waits_for_every_part_checks_it_and_writes_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loadgen.gpu.stage as stage

    monkeypatch.setattr(stage, "MIB", 64)  # parcels of a few hundred bytes for the test
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    vsite = build_vsite(fake_wheel(tmp_path / "vllm.whl"), wheels, tmp_path / "vsite.tar.xz",
                        tmp_path / "work", xz_threads=1)
    budget = vsite.stat().st_size // 3 + 1
    parcels = stage.make_parcels([Archive("vsite.tar.xz", vsite, "vsite")],
                                 tmp_path / "stage", budget)
    assert [p.name for p in parcels] == ["parcel-1", "parcel-2", "parcel-3"]
    for parcel in parcels:
        parts = [f for f in parcel.iterdir() if f.name != "manifest.json"]
        assert sum(f.stat().st_size for f in parts) <= budget
        assert json.loads((parcel / "manifest.json").read_text())["parcels"] == 3
    root, dest = tmp_path / "host", tmp_path / "v"
    lines = unpack(parcels[0], root, vsite_dest=dest)
    assert "still missing" in lines[-1] and not (dest / "vsite").exists()
    unpack(parcels[1], root, vsite_dest=dest)
    lines = unpack(parcels[2], root, vsite_dest=dest)
    assert "everything unpacked" in lines[-1]
    assert (dest / "vsite/vllm/__init__.py").read_text() == "__version__ = '0.25.0'\n"
    env = (root / "env.sh").read_text()
    assert f"{dest / 'vsite'}:" in env and "VLLM_USE_FLASHINFER_SAMPLER=0" in env
    assert not list((root / "parts").iterdir())  # the parts are gone once unpacked


def test_a_damaged_part_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loadgen.gpu.stage as stage

    monkeypatch.setattr(stage, "MIB", 64)
    archive = tmp_path / "vsite.tar.xz"
    archive.write_bytes(bytes(range(256)) * 4)
    parcels = stage.make_parcels([Archive("vsite.tar.xz", archive, "vsite")],
                                 tmp_path / "stage", 600)
    part = next(parcels[1].glob("*.part*"))
    part.write_bytes(b"x" + part.read_bytes()[1:])
    unpack(parcels[0], tmp_path / "host", vsite_dest=tmp_path / "v")
    with pytest.raises(SystemExit, match="SHA-256"):
        unpack(parcels[1], tmp_path / "host", vsite_dest=tmp_path / "v")


def test_environment_names_both_unpacked_archives() -> None:
    manifest = {"archives": [{"unpack": "vsite"}, {"unpack": "stack"}]}
    env = environment(manifest, Path("/tmp/v"), Path("/tmp/stack"))
    assert ". /tmp/stack/env.sh" in env and 'PYTHONPATH="/tmp/v/vsite:' in env


def staged_wheels() -> dict[str, str]:
    """name → version of the wheels loadgen/gpu/stage_stack.sh puts in the stack archive."""
    text = (ROOT / "loadgen/gpu/stage_stack.sh").read_text()
    block = text.split("WHEELS=(", 1)[1].split("\n)", 1)[0]
    pins = (word for line in block.splitlines() for word in line.split("#")[0].split())
    return dict(pin.split("==", 1) for pin in pins)


def test_the_stack_archive_carries_the_grpc_and_protobuf_the_code_needs() -> None:
    """A stack archive with an older grpcio than the generated stubs check for stops the
    estimator and ingest at import on the GPU host (it happened: 1.85.1 against 1.85.4)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    wheels = staged_wheels()
    generated = re.findall(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                           "".join(p.read_text() for p in (ROOT / "qlm/api/v1").glob("*_grpc.py")))
    assert generated and all(Version(wheels["grpcio"]) >= Version(v) for v in generated)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        name, _, spec = requirement.partition(">=")
        if name in wheels and spec:
            assert Version(wheels[name]) in SpecifierSet(f">={spec}"), requirement
