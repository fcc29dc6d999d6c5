"""What the GPU host needs, built here and carried there in calls of at most 64 MiB each.

The GPU host (docs/results/gpu/README.md) has Python 3.12, torch 2.11 and transformers,
but no network, no vLLM, no Java, no redis-server. ``make gpu-stage`` builds, from the
repository root:

1. ``fetch``: vLLM 0.25.0's wheel (``.vllm-dl/``) and the wheels it imports at start-up
   that the host lacks (``.whl/``, :data:`DEPENDENCY_WHEELS`), by ``pip download`` for
   CPython 3.12 on x86-64 Linux;
2. ``vllm``: ``.stage/vsite.tar.xz``, one folder ``vsite/`` of vLLM and those wheels
   (as ``pip install --target`` lays them out), less what a dense model on Hopper never
   loads (:data:`DROP`), with the GPU code of other architectures zeroed in vLLM's kernel
   libraries (:data:`TRIM`: each ``.nv_fatbin`` entry of an ELF cubin for an SM other
   than 90 keeps its header, its payload becomes zeros, which xz then packs to nothing;
   the driver still parses the fatbin and picks the sm_90 cubin or the PTX);
3. ``make stack-archive`` (``loadgen/gpu/stage_stack.sh``): ``.stack/stack.tar.xz``,
   Redis, Kafka with a Java runtime and the services' wheels;
4. ``parcels``: both archives cut into ``.stage/parcel-1`` … ``parcel-N``, each small
   enough to travel with the repository in one call (64 MiB less the repository's files
   less a margin), plus the manifest (sizes, SHA-256) in each.

On the GPU host, one call per parcel, in order, on the same warm host (each call carries
its parcel folder)::

    python3 -m loadgen.gpu.stage unpack .stage/parcel-1
    ...
    python3 -m loadgen.gpu.stage unpack .stage/parcel-N && . /tmp/qlm-gpu/env.sh

``unpack`` keeps the parts under ``/tmp/qlm-gpu``; when an archive is complete it checks
its SHA-256 and unpacks it (vsite into ``/tmp/v``, the stack by
``loadgen/gpu/unpack_stack.sh`` into ``/tmp/stack``), and once everything is unpacked it
writes ``/tmp/qlm-gpu/env.sh`` (vLLM's and the stack's paths and the variables vLLM needs
there). It says which parcels are still missing. Nothing here imports beyond the
standard library, so it runs on the bare host.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_VERSION = "0.25.0"
#: Wheels vLLM imports at start-up that the GPU host lacks (exact versions: those tested).
DEPENDENCY_WHEELS = (
    "annotated-types==0.8.0", "apache-tvm-ffi==0.1.15.post2", "blake3==1.0.11",
    "cachetools==8.0.1", "cbor2==6.2.1", "fastapi==0.136.3", "httpx2==2.16.2", "jiter==0.19.0",
    "llguidance==1.7.6", "msgspec==0.22.0", "openai==3.54.0", "openai-harmony==0.0.8",
    "partial-json-parser==0.2.1.1.post7", "pybase64==1.5.1", "pydantic==2.14.3",
    "pydantic-core==2.50.4", "pyzmq==27.3.0", "setproctitle==1.3.8", "sniffio==1.3.1",
    "starlette==1.10.0", "typing-extensions==4.16.0", "typing-inspection==0.4.5",
    "xgrammar==0.2.8",
)
#: pip's platform tags of the GPU host (CPython 3.12, x86-64, glibc 2.39).
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
#: What a dense model on Hopper never loads.
DROP = (
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",  # FlashAttention 2: pre-Hopper (sm_90 uses FA3)
    "vllm/vllm-rs",  # the Rust front end (opt-in)
    "vllm/third_party/deep_gemm",  # FP8 DeepGEMM JIT (its import is guarded)
    "vllm/third_party/fmha_sm100",  # Blackwell-only kernels
)
#: Dropped too unless --keep-moe (mixture-of-experts kernels).
MOE_LIBRARY = "vllm/_moe_C_stable_libtorch.abi3.so"
#: vLLM's kernel libraries whose other-architecture cubins are zeroed.
TRIM = ("vllm/_C_stable_libtorch.abi3.so", MOE_LIBRARY, "vllm/_flashmla_C.abi3.so",
        "vllm/_qutlass_C.abi3.so")
KEEP_SM = frozenset({90})
FATBIN_MAGIC = 0xBA55ED50
MIB = 1024 * 1024
#: What one device call may carry, and what is kept free beside the repository.
CALL_LIMIT = 64 * MIB
MARGIN = 1 * MIB
GPU_ROOT = Path("/tmp/qlm-gpu")
MANIFEST = "manifest.json"


# ------------------------------------------------------------------ ELF / fatbin
def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int] | None:
    """(file offset, size) of section ``name`` of a 64-bit little-endian ELF, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name_at, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name_at, offset, size

    _, strings_at, _ = header(shstrndx)
    wanted = name.encode()
    for i in range(shnum):
        name_at, offset, size = header(i)
        start = strings_at + name_at
        if data[start:data.index(b"\0", start)] == wanted:
            return offset, size
    return None


def blank_foreign_cubins(data: bytearray, offset: int, size: int,
                         keep: frozenset[int] = KEEP_SM) -> tuple[int, int]:
    """Zero the payload of every ELF cubin in the fatbin section at ``offset`` whose SM is
    not in ``keep`` (headers and PTX kept); returns (bytes zeroed, bytes kept)."""
    blanked = kept = 0
    pos, end = offset, offset + size
    while pos + 16 <= end:
        magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8
            continue
        entry, stop = pos + header_size, pos + header_size + body_size
        while entry < stop:
            kind, _ver, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            sm, = struct.unpack_from("<I", data, entry + 28)
            if kind == 2 and sm not in keep:  # an ELF cubin for another architecture
                data[entry + entry_header:entry + entry_header + padded] = bytes(padded)
                blanked += padded
            else:
                kept += padded
            entry += entry_header + padded
        pos = stop
    return blanked, kept


def trim_library(path: Path, keep: frozenset[int] = KEEP_SM) -> tuple[int, int]:
    """:func:`blank_foreign_cubins` over ``path``'s ``.nv_fatbin`` section, in place."""
    data = bytearray(path.read_bytes())
    section = elf_section(data, ".nv_fatbin")
    if section is None:
        return 0, 0
    result = blank_foreign_cubins(data, *section, keep=keep)
    path.write_bytes(data)
    return result


# ------------------------------------------------------------------ here: fetch and build
def pip_download(names: Sequence[str], into: Path) -> None:
    tags = [f"--platform={p}" for p in PLATFORMS]
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                           "--only-binary=:all:", "--python-version", "3.12",
                           "--implementation", "cp", *tags, "-d", str(into), *names])


def fetch(download: Path, wheels: Path) -> Path:
    """vLLM's wheel into ``download``, the dependency wheels into ``wheels``; the vLLM wheel."""
    found = sorted(download.glob(f"vllm-{VLLM_VERSION}-*.whl"))
    if not found:
        pip_download([f"vllm=={VLLM_VERSION}"], download)
        found = sorted(download.glob(f"vllm-{VLLM_VERSION}-*.whl"))
    pip_download(list(DEPENDENCY_WHEELS), wheels)
    return found[0]


def build_vsite(wheel: Path, wheels: Path, out: Path, work: Path, *, keep_moe: bool = True,
                trim: bool = True, xz_threads: int = 2) -> Path:
    """``out`` (.tar.xz): ``vsite/`` = the vLLM wheel + the wheels of ``wheels`` (module
    docstring, step 2)."""
    site = work / "vsite"
    shutil.rmtree(work, ignore_errors=True)
    site.mkdir(parents=True)
    zipfile.ZipFile(wheel).extractall(site)
    for rel in (*DROP, *(() if keep_moe else (MOE_LIBRARY,))):
        target = site / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        print("dropped", rel)
    for rel in TRIM if trim else ():
        target = site / rel
        if target.exists():
            zeroed, kept = trim_library(target)
            print(f"trimmed {rel}: zeroed {zeroed / MIB:.1f} MiB of non-sm_90 cubins, "
                  f"kept {kept / MIB:.1f} MiB")
    for library in site.glob("vllm/**/*.so"):
        library.chmod(0o755)
    deps = sorted(wheels.glob("*.whl"))
    if deps:
        tags = [f"--platform={p}" for p in PLATFORMS]
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                               "--no-deps", "--no-compile", "--only-binary=:all:",
                               "--python-version", "3.12", "--implementation", "cp", *tags,
                               "--target", str(site), *map(str, deps)])
    shutil.rmtree(site / "bin", ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tar_path = out.with_suffix("")  # .tar
    with tarfile.open(tar_path, "w") as tar:
        tar.add(site, arcname="vsite")
    subprocess.check_call(["xz", "-9e", f"-T{xz_threads}", "-f", str(tar_path)])
    shutil.rmtree(work, ignore_errors=True)
    print("wrote", out, f"{out.stat().st_size / MIB:.1f} MiB")
    return out


# ------------------------------------------------------------------ parcels
@dataclass(frozen=True, slots=True)
class Archive:
    """One archive that travels: its name, its file, how the host unpacks it."""

    name: str
    path: Path
    unpack: str  # "vsite": tar into /tmp/v; "stack": loadgen/gpu/unpack_stack.sh


#: Files are counted in whole blocks of this size: the call's limit is met by what the tree
#: takes in transit, not by the sum of file sizes (a parcel cut to 64 MiB less the sum,
#: 51.5 MiB beside 11.5 MiB of ~3,000 files, was refused as too large; by blocks they
#: take 19 MiB).
BLOCK = 4096


def repository_bytes(root: Path = REPO_ROOT) -> int:
    """Bytes of what travels with every call: tracked and untracked-not-ignored files,
    each rounded up to whole :data:`BLOCK` s."""
    out = subprocess.check_output(["git", "-C", str(root), "ls-files", "-z", "--cached",
                                   "--others", "--exclude-standard"])
    return sum(-(-(root / name).stat().st_size // BLOCK) * BLOCK
               for name in out.decode().split("\0") if name and (root / name).is_file())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def make_parcels(archives: Sequence[Archive], out: Path, parcel_bytes: int) -> list[Path]:
    """Cut ``archives`` into parts, packed in order into ``out/parcel-1`` … so that each
    parcel holds at most ``parcel_bytes``; each parcel has the whole manifest."""
    if parcel_bytes < MIB:
        raise ValueError(f"a parcel of {parcel_bytes} bytes is too small: the repository "
                         "leaves no room in a call")
    for old in out.glob("parcel-*"):
        shutil.rmtree(old)
    parts: list[list[tuple[Archive, int, int, int]]] = [[]]  # (archive, index, start, length)
    room = parcel_bytes
    manifest: dict[str, Any] = {"archives": []}
    for archive in archives:
        size, start, index = archive.path.stat().st_size, 0, 0
        while start < size:
            if room == 0:
                parts.append([])
                room = parcel_bytes
            length = min(room, size - start)
            parts[-1].append((archive, index, start, length))
            start, index, room = start + length, index + 1, room - length
        manifest["archives"].append({"name": archive.name, "size": size, "parts": index,
                                     "sha256": sha256(archive.path), "unpack": archive.unpack})
    manifest["parcels"] = len(parts)
    folders = []
    for number, content in enumerate(parts, start=1):
        folder = out / f"parcel-{number}"
        folder.mkdir(parents=True)
        for archive, index, start, length in content:
            with archive.path.open("rb") as source:
                source.seek(start)
                (folder / f"{archive.name}.part{index:03d}").write_bytes(source.read(length))
        (folder / MANIFEST).write_text(json.dumps({**manifest, "parcel": number}, indent=1))
        folders.append(folder)
    return folders


# ------------------------------------------------------------------ there: unpack
def unpack(parcel: Path, root: Path = GPU_ROOT, vsite_dest: Path = Path("/tmp/v"),
           stack_dest: Path = Path("/tmp/stack")) -> list[str]:
    """Keep ``parcel``'s parts under ``root``; unpack every archive that is complete;
    write ``root/env.sh`` once all are. Returns what happened, line by line."""
    manifest = json.loads((parcel / MANIFEST).read_text())
    parts = root / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for part in sorted(parcel.glob("*.part*")):
        shutil.copyfile(part, parts / part.name)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    lines = [f"parcel {manifest['parcel']} of {manifest['parcels']} kept in {parts}"]
    missing: list[str] = []
    for entry in manifest["archives"]:
        name = entry["name"]
        done = root / f"{name}.unpacked"
        if done.exists():
            continue
        names = [parts / f"{name}.part{i:03d}" for i in range(entry["parts"])]
        if not all(p.exists() for p in names):
            missing += [p.name for p in names if not p.exists()]
            continue
        whole = root / name
        with whole.open("wb") as out:
            for p in names:
                out.write(p.read_bytes())
        if whole.stat().st_size != entry["size"] or sha256(whole) != entry["sha256"]:
            raise SystemExit(f"{name}: the parts do not add up to the archive "
                             "(size or SHA-256 differs); carry its parcels again")
        lines += unpack_archive(whole, entry["unpack"], vsite_dest, stack_dest)
        for p in names:
            p.unlink()
        whole.unlink()
        done.write_text(entry["sha256"])
    if missing:
        lines.append(f"still missing: {', '.join(missing)} (the next parcels)")
        return lines
    env = root / "env.sh"
    env.write_text(environment(manifest, vsite_dest, stack_dest))
    lines.append(f"everything unpacked: . {env}")
    return lines


def unpack_archive(archive: Path, how: str, vsite_dest: Path, stack_dest: Path) -> list[str]:
    if how == "vsite":
        shutil.rmtree(vsite_dest / "vsite", ignore_errors=True)
        vsite_dest.mkdir(parents=True, exist_ok=True)
        subprocess.check_call(["tar", "-xJf", str(archive), "-C", str(vsite_dest)])
        return [f"{archive.name}: vLLM and its wheels in {vsite_dest / 'vsite'}"]
    if how == "stack":
        subprocess.check_call(["bash", str(REPO_ROOT / "loadgen/gpu/unpack_stack.sh"),
                               str(archive), str(stack_dest)])
        return [f"{archive.name}: Redis, Kafka and the wheels in {stack_dest}"]
    raise SystemExit(f"{archive.name}: unknown way to unpack {how!r}")


def environment(manifest: dict[str, Any], vsite_dest: Path, stack_dest: Path) -> str:
    """env.sh: the paths and variables of what ``manifest`` unpacked."""
    kinds = {a["unpack"] for a in manifest["archives"]}
    lines = ["# written by python3 -m loadgen.gpu.stage unpack"]
    if "stack" in kinds:
        lines.append(f". {stack_dest / 'env.sh'}")
    if "vsite" in kinds:
        lines += [f'export PYTHONPATH="{vsite_dest / "vsite"}:{REPO_ROOT}'
                  '${PYTHONPATH:+:$PYTHONPATH}"',
                  "export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 "
                  "PYTHONUNBUFFERED=1"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ command line
def archives_present(stage: Path, stack: Path) -> list[Archive]:
    found = [Archive("vsite.tar.xz", stage / "vsite.tar.xz", "vsite"),
             Archive("stack.tar.xz", stack / "stack.tar.xz", "stack")]
    missing = [str(a.path) for a in found if not a.path.is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: build them first (make gpu-stage)")
    return found


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download vLLM's wheel and its dependency wheels")
    f.add_argument("--download", type=Path, default=Path(".vllm-dl"))
    f.add_argument("--wheels", type=Path, default=Path(".whl"))
    v = sub.add_parser("vllm", help="build .stage/vsite.tar.xz")
    v.add_argument("--wheel", type=Path, help=f"default: .vllm-dl/vllm-{VLLM_VERSION}-*.whl")
    v.add_argument("--wheels", type=Path, default=Path(".whl"))
    v.add_argument("--out", type=Path, default=Path(".stage/vsite.tar.xz"))
    v.add_argument("--work", type=Path, default=Path("/tmp/qlm-vllm-stage"))
    v.add_argument("--no-moe", action="store_true", help="drop the mixture-of-experts kernels")
    v.add_argument("--no-trim", action="store_true", help="keep every GPU architecture")
    v.add_argument("--xz-threads", type=int, default=2)
    c = sub.add_parser("parcels", help="cut the archives into parcels of one call each")
    c.add_argument("--stage", type=Path, default=Path(".stage"))
    c.add_argument("--stack", type=Path, default=Path(".stack"))
    c.add_argument("--parcel-mib", type=float,
                   help="default: 64 MiB less the repository's files less 1 MiB")
    u = sub.add_parser("unpack", help="on the GPU host: keep a parcel, unpack what is whole")
    u.add_argument("parcel", type=Path)
    u.add_argument("--root", type=Path, default=GPU_ROOT)
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.command == "fetch":
        print("vLLM wheel:", fetch(args.download, args.wheels))
    elif args.command == "vllm":
        wheel = args.wheel or next(iter(sorted(Path(".vllm-dl").glob(
            f"vllm-{VLLM_VERSION}-*.whl"))), None)
        if wheel is None or not Path(wheel).is_file():
            raise SystemExit("no vLLM wheel: run `python -m loadgen.gpu.stage fetch` first")
        build_vsite(Path(wheel), args.wheels, args.out, args.work, keep_moe=not args.no_moe,
                    trim=not args.no_trim, xz_threads=args.xz_threads)
    elif args.command == "parcels":
        budget = (int(args.parcel_mib * MIB) if args.parcel_mib
                  else CALL_LIMIT - repository_bytes() - MARGIN)
        folders = make_parcels(archives_present(args.stage, args.stack), args.stage, budget)
        for folder in folders:
            size = sum(f.stat().st_size for f in folder.iterdir())
            print(f"{folder}: {size / MIB:.1f} MiB")
        print(f"{len(folders)} parcels of at most {budget / MIB:.1f} MiB (one device call each, "
              "in order, on one warm host: python3 -m loadgen.gpu.stage unpack <parcel>)")
    else:
        for line in unpack(args.parcel, args.root):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
