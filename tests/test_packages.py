"""FHIR packages: the cache layout of the FHIR tools, and checksums that catch tampering."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from cityhealth.fhir import packages
from cityhealth.fhir.packages import PackageError, package_dir, split_spec


def test_cache_layout_is_name_hash_version(tmp_path: Path) -> None:
    assert package_dir(tmp_path, "hl7.fhir.r4.examples@4.0.1") == (
        tmp_path / "hl7.fhir.r4.examples#4.0.1" / "package"
    )


@pytest.mark.parametrize("spec", ["hl7.fhir.r4.examples", "@4.0.1", "name@"])
def test_spec_needs_name_and_version(spec: str) -> None:
    with pytest.raises(PackageError):
        split_spec(spec)


def test_known_package_with_wrong_sha1_is_refused(tmp_path: Path) -> None:
    tarball = tmp_path / "p.tgz"
    tarball.write_bytes(b"not the official package")
    with pytest.raises(PackageError, match="sha1"):
        packages._verify(tarball, "hl7.fhir.r4.examples@4.0.1", None)


def test_integrity_mismatch_is_refused(tmp_path: Path) -> None:
    tarball = tmp_path / "p.tgz"
    tarball.write_bytes(b"content")
    good = "sha512-" + base64.b64encode(hashlib.sha512(b"content").digest()).decode()
    packages._verify(tarball, "some.pkg@1.0.0", good)
    bad = "sha512-" + base64.b64encode(hashlib.sha512(b"other").digest()).decode()
    with pytest.raises(PackageError, match="integrity"):
        packages._verify(tarball, "some.pkg@1.0.0", bad)


def test_installed_core_package_has_the_definition_bundles() -> None:
    from cityhealth.config import get_settings
    from cityhealth.fhir.definitions import RESOURCES_FILE, SEARCH_PARAMS_FILE

    settings = get_settings()
    directory = package_dir(settings.fhir_package_cache, settings.fhir_core_package)
    assert (directory / SEARCH_PARAMS_FILE).is_file()
    assert (directory / RESOURCES_FILE).is_file()
