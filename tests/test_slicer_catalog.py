"""The extension's Extensions Index entry and metadata, checked offline with the index's own rules
(issue 28 point 9).

The rules are those of the Extensions Index's checker (``scripts/check_description_files.py`` of
Slicer/ExtensionsIndex, read, not copied) and of the catalog entry schema it validates against
(``Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json`` of Slicer/Slicer): the entry's keys and
types (no other keys: homepage, icon, screenshots, contributors and description belong in CMakeLists.txt),
a known category, an ``https``/``git`` scm_url to a repository whose name contains "Slicer", a top-level
``project()`` named like the entry file, icon and screenshot URLs starting with http and pointing at
images, a licence file at the root. What the checker does over the network (cloning the repository,
downloading the schema and the images) is replaced here by the same checks on this folder, which is
what scripts/export_slicer_extension.sh publishes: every URL into the extension's own repository must
name a file of this folder that is a real PNG/JPEG.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "slicer_extension"
ENTRY = EXT / "ExtensionsIndex" / "HybridCT.json"

#: the properties of the catalog entry schema v1.0.2 with their JSON types (additionalProperties: false)
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                     "enabled": bool, "tier": int}
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
#: a few of the categories the index accepts (its list has ~60; the module's is among them)
KNOWN_CATEGORIES = {"Segmentation", "Active Learning", "Analysis", "Quantification", "Informatics", "Utilities"}
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")


def _cmake_sets(text: str) -> dict:
    return {m.group(1): m.group(2) for m in re.finditer(r'set\s*\((EXTENSION_\w+)\s+"([^"]*)"\s*\)', text)}


def _entry() -> dict:
    return json.loads(ENTRY.read_text(encoding="utf-8"))


def test_entry_matches_the_catalog_schema():
    entry = _entry()
    for key in SCHEMA_REQUIRED:
        assert entry.get(key), f"{key} is missing or empty"
    extra = set(entry) - set(SCHEMA_PROPERTIES)
    assert not extra, f"keys the schema does not allow (additionalProperties: false): {extra}"
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_PROPERTIES[key]) and not (key == "tier" and isinstance(value, bool)), key
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-v1.0.")
    assert entry.get("scm_type", "git") in ("git", "local")
    assert 1 <= entry.get("tier", 1) <= 5
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))


def test_category_and_scm_url():
    entry = _entry()
    assert entry["category"] in KNOWN_CATEGORIES
    cmake = _cmake_sets((EXT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert cmake["EXTENSION_CATEGORY"] == entry["category"]
    url = entry["scm_url"]
    assert "://" in url and urlsplit(url).scheme in ("git", "https")
    repo_name = Path(urlsplit(url).path.split("/")[-1]).stem
    assert "slicer" in repo_name.lower(), f"repository name {repo_name!r}: the index wants e.g. Slicer{repo_name}"


def _own_file(url: str) -> Path:
    """The file of this folder that a raw URL into the extension's repository names."""
    repo = urlsplit(_entry()["scm_url"]).path.removesuffix(".git").strip("/")  # owner/SlicerHybridCT
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.netloc == "raw.githubusercontent.com", url
    path = parts.path.strip("/")
    assert path.startswith(repo + "/"), f"{url} is not in the extension's repository {repo}"
    _branch, _, rel = path[len(repo) + 1:].partition("/")
    return EXT / rel


def _is_image(path: Path) -> bool:
    head = path.read_bytes()[:8]
    return head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff") or head[:6] in (b"GIF87a",
                                                                                                      b"GIF89a")


def test_cmakelists_as_the_checker_reads_it():
    text = (EXT / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.findall(r"project\s*\(\s*([^\s)]+)", text, re.IGNORECASE)
    assert project and project[0] == ENTRY.stem, "project() must be named like the catalog entry file"
    sets = _cmake_sets(text)
    icon = sets.get("EXTENSION_ICONURL", "")
    assert icon.startswith("http"), "EXTENSION_ICONURL"
    assert _is_image(_own_file(icon)), icon
    shots = sets.get("EXTENSION_SCREENSHOTURLS", "").split()
    assert shots and all(u.startswith("http") for u in shots), "EXTENSION_SCREENSHOTURLS"
    for url in shots:
        path = _own_file(url)
        assert path.is_file() and _is_image(path), url
        assert "rendering" in path.name  # labelled for what they are: not Slicer screenshots
    assert sets.get("EXTENSION_HOMEPAGE", "").startswith("https://")
    assert sets["EXTENSION_DESCRIPTION"].startswith("Research use only, not for diagnosis.")


def test_contributors_are_name_and_organisation():
    sets = _cmake_sets((EXT / "CMakeLists.txt").read_text(encoding="utf-8"))
    people = [p.strip() for p in sets["EXTENSION_CONTRIBUTORS"].split(",")]
    assert people and all(re.fullmatch(r"[^()]+ \([^()]+\)", p) for p in people), people
    module = (EXT / "HybridCT" / "HybridCT.py").read_text(encoding="utf-8")
    for person in people:
        assert person in module  # the module's contributors say the same


def test_ships_its_own_license_and_readme():
    found = [n for n in LICENSE_NAMES if (EXT / n).is_file()]
    assert found, "no licence file at the extension's root"
    text = (EXT / found[0]).read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License") and "3D Slicer Contribution" not in text
    cmake = (EXT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "set(EXTENSION_README_FILE ${CMAKE_CURRENT_SOURCE_DIR}/README.md)" in cmake
    assert "set(EXTENSION_LICENSE_FILE ${CMAKE_CURRENT_SOURCE_DIR}/LICENSE)" in cmake
    assert cmake.index("EXTENSION_LICENSE_FILE") < cmake.index("include(${Slicer_USE_FILE})")  # before the default
    readme = (EXT / "README.md").read_text(encoding="utf-8")
    assert "Hybrid CT" in readme and "not for diagnosis" in readme
