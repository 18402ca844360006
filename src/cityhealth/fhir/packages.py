"""FHIR NPM packages: installed with `npm pack` into the local FHIR package cache.

The cache uses the layout of the FHIR community's tools: ``<cache>/<name>#<version>/package/``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

#: Checksums (sha1 of the tarball) of packages whose content the engine depends on.
KNOWN_SHA1 = {
    "hl7.fhir.r4.examples@4.0.1": "537ea7db3f3c7b3575fe2eaa7808bad21261cca3",
}


class PackageError(Exception):
    """A package could not be installed or found."""


def split_spec(spec: str) -> tuple[str, str]:
    name, sep, version = spec.partition("@")
    if not sep or not name or not version:
        raise PackageError(f"expected NAME@VERSION, got {spec!r}")
    return name, version


def package_dir(cache: Path, spec: str) -> Path:
    name, version = split_spec(spec)
    return cache / f"{name}#{version}" / "package"


def is_installed(cache: Path, spec: str) -> bool:
    return (package_dir(cache, spec) / "package.json").is_file()


def _verify(tarball: Path, spec: str, integrity: str | None) -> None:
    data = tarball.read_bytes()
    expected_sha1 = KNOWN_SHA1.get(spec)
    if expected_sha1 and hashlib.sha1(data).hexdigest() != expected_sha1:
        raise PackageError(f"{spec}: sha1 checksum mismatch")
    if integrity and integrity.startswith("sha512-"):
        digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
        if digest != integrity.removeprefix("sha512-"):
            raise PackageError(f"{spec}: sha512 integrity mismatch")


def npm_pack(spec: str, destination: Path) -> tuple[Path, str | None]:
    """Download NAME@VERSION's tarball from the npm registry into `destination`; its path and
    the registry's integrity string."""
    if shutil.which("npm") is None:
        raise PackageError(f"npm is needed to fetch {spec}; install Node.js and npm")
    proc = subprocess.run(
        ["npm", "pack", spec, "--json", "--pack-destination", str(destination)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise PackageError(f"npm pack {spec} failed: {proc.stderr.strip()[-500:]}")
    info = json.loads(proc.stdout)[0]
    return destination / info["filename"], info.get("integrity")


def install(cache: Path, spec: str, force: bool = False) -> Path:
    """Fetch NAME@VERSION with `npm pack`, verify its checksum and unpack it into the cache."""
    target = package_dir(cache, spec)
    if is_installed(cache, spec) and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tarball, integrity = npm_pack(spec, Path(tmp))
        _verify(tarball, spec, integrity)
        staging = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            tar.extractall(staging, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging / "package"), str(target))
    return target
