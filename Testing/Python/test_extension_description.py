"""The Extensions Index entry (SSMSR.json) against the index's schema and the rules of its checker, and its agreement
with the top-level CMakeLists.txt, the module's own metadata, pyproject.toml and the LICENSE.

The index's files are not needed at test time (no network): the facts checked here were read from them and are
written down below, each with the commit and file it comes from. The checker's network-bound rules (cloning the
repository, the GitHub topic, downloading the icon and screenshot) are replaced by their offline equivalents: the
URLs point into this repository's default branch, and the files they name exist here.
"""

import ast
import hashlib
import json
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_PATH = ROOT / "SSMSR.json"

# ---------------------------------------------------------------------------------------------------------------------
# Facts read from https://github.com/Slicer/ExtensionsIndex at commit 07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c.
INDEX_COMMIT = "07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c"

# schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (identical to Schemas/ of the same name in Slicer/Slicer
# at 583e9b37d50ead7daf7b783dce465ccaecec8809, the URL the checker downloads): draft-07, "additionalProperties": false.
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.2.json#")
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
#: property -> (JSON type, extra constraints)
SCHEMA_PROPERTIES = {
    "$schema": ("string", {}),
    "category": ("string", {}),
    "scm_url": ("string", {}),
    "scm_revision": ("string", {}),
    "scm_type": ("string", {"enum": ("git", "local")}),
    "build_dependencies": ("array", {"items": "string"}),
    "dicom_support_rule": ("string", {}),
    "build_subdirectory": ("string", {}),
    "enabled": ("boolean", {}),
    "tier": ("integer", {"minimum": 1, "maximum": 5}),
}

# README.md, "Extension tiers": 1 experimental, 3 community-supported, 5 supported by Slicer core developers; 2 and 4
# reserved. .github/PULL_REQUEST_TEMPLATE.md: tier 3 asks, among others, for packages built on all platforms and
# maintainers answering on the forum, which a new extension cannot show yet: it enters at tier 1.
NEW_EXTENSION_TIER = 1

# scripts/check_description_files.py
#   check_json_file_format: the file parses as JSON and has LF line endings only.
#   check_extension_name: the name (file stem) must not start with "slicer", compared case-insensitively.
#   check_category: "Registration" is one of ACCEPTED_EXTENSION_CATEGORIES (the full list is not copied here).
CATEGORY_ACCEPTED_BY_CHECKER = "Registration"
#   check_scm_url_syntax: "://" in scm_url and its scheme is one of:
SCM_URL_SCHEMES = ("git", "https")
#   check_git_repository_name: the last path component of scm_url, without extension, starts with one of:
REPOSITORY_NAME_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
#   check_cmakelists_content: the first project(<name>) of the top-level CMakeLists.txt equals the file stem;
#   set(EXTENSION_ICONURL "<url>") and set(EXTENSION_SCREENSHOTURLS "<url> <url> ...") are present, and each URL starts
#   with "http" and downloads as image/png, image/jpeg or image/gif.
#   check_license_file: one of these files is in the repository root:
LICENSE_FILE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
#   check_repository_size: the checked-out repository (with .git) stays under this size:
REPOSITORY_SIZE_LIMIT_MB = 100
#   check_dependencies: every build dependency is the stem of a .json entry in the index. The index holds PyTorch.json
#   (scm_url https://github.com/fepegar/SlicerPyTorch.git); PyTorch's own entry has no build dependencies.
INDEX_ENTRIES_USED = {"PyTorch"}
#   check_git_repository_topics (the GitHub topic "3d-slicer-extension") needs the GitHub API: not checked here.
# .pre-commit-config.yaml and .prettierrc.js: prettier formats the JSON (2-space indent, every non-empty array one item a
# line), files end with one newline, no trailing whitespace, no tabs.

# Slicer/Slicer at 583e9b37d50ead7daf7b783dce465ccaecec8809 (unchanged since v5.6.2),
# Extensions/CMake/SlicerExtensionDescriptionSpec.cmake, CONTRIBUTORS:
#   "Firstname1 Lastname1 ([SubOrg1, ]Org1), Firstname2 Lastname2 ([SubOrg2, ]Org2)"
CONTRIBUTOR = re.compile(r"[^(),]+ \((?:[^(),]+, )?[^(),]+\)")
# ---------------------------------------------------------------------------------------------------------------------

#: SHA-256 of the Apache License 2.0 text as the Apache Software Foundation distributes it (LICENSE-2.0.txt, 202 lines,
#: with the appendix); SimpleITK's and tornado's wheels ship the same bytes.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
PLACEHOLDER_CONTRIBUTORS = "SSMSR contributors"


@pytest.fixture(scope="module")
def entry() -> dict:
    return json.loads(ENTRY_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cmake() -> dict:
    """The top-level CMakeLists.txt: project name and the EXTENSION_* variables, as the checker's patterns read them."""
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    values = {"project": re.findall(r"project\s*\(\s*([^\s)]+)", text, re.IGNORECASE)[0]}
    for name, value in re.findall(r'^\s*set\s*\(\s*EXTENSION_(\w+)\s+("[^"]*"|[^)\s]+)\s*\)', text, re.MULTILINE):
        values[name] = value.strip('"')
    values["text"] = text
    return values


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {str: "string", list: "array", dict: "object", float: "number", type(None): "null"}[type(value)]


def test_entry_is_valid_against_the_index_schema(entry):
    assert set(SCHEMA_REQUIRED) <= set(entry), "missing required keys"
    assert set(entry) <= set(SCHEMA_PROPERTIES), f"keys the schema does not allow: {set(entry) - set(SCHEMA_PROPERTIES)}"
    for key, value in entry.items():
        kind, constraints = SCHEMA_PROPERTIES[key]
        assert _json_type(value) == kind, f"{key} should be a {kind}"
        if "enum" in constraints:
            assert value in constraints["enum"], key
        if "items" in constraints:
            assert all(_json_type(item) == constraints["items"] for item in value), key
        if "minimum" in constraints:
            assert constraints["minimum"] <= value <= constraints["maximum"], key
    assert entry["$schema"] == SCHEMA_URL


def test_entry_values(entry, cmake):
    assert entry["category"] == CATEGORY_ACCEPTED_BY_CHECKER
    assert entry["scm_url"] == "https://github.com/ssmsr/SlicerSSMSR.git"
    assert entry["scm_revision"] == "main"  # a branch, as the submission checklist recommends
    assert entry["build_dependencies"] == ["PyTorch"]
    assert set(entry["build_dependencies"]) <= INDEX_ENTRIES_USED
    assert entry["tier"] == NEW_EXTENSION_TIER
    assert entry.get("enabled", True) is True
    assert entry.get("scm_type", "git") == "git"


def test_entry_file_format():
    raw = ENTRY_PATH.read_bytes()
    assert b"\r" not in raw and b"\t" not in raw
    text = raw.decode("utf-8")
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert all(line == line.rstrip() for line in text.splitlines())
    # prettier's layout for this content is json.dumps(indent=2): one array item a line, keys as written.
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


def test_names_follow_the_checker(entry):
    assert not ENTRY_PATH.stem.lower().startswith("slicer")
    url = entry["scm_url"]
    assert "://" in url and urllib.parse.urlsplit(url).scheme in SCM_URL_SCHEMES
    repository = Path(urllib.parse.urlsplit(url.strip().strip("/")).path).stem
    assert repository.startswith(REPOSITORY_NAME_PREFIXES), repository


def test_cmakelists_agrees_with_the_entry(entry, cmake):
    assert cmake["project"] == ENTRY_PATH.stem
    assert cmake["CATEGORY"] == entry["category"]
    assert cmake["HOMEPAGE"] == re.sub(r"\.git$", "", entry["scm_url"])
    depends = cmake["DEPENDS"].split()
    assert (depends if depends != ["NA"] else []) == entry["build_dependencies"]
    assert cmake["BUILD_SUBDIRECTORY"] == entry.get("build_subdirectory", ".")
    # The checker's own patterns for the two URL variables (a quoted value, closed by ")").
    assert re.search(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake["text"], re.IGNORECASE)
    assert re.search(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake["text"], re.IGNORECASE)


def _local_file_of(url: str, entry: dict) -> Path:
    """The file of this repository that a raw.githubusercontent.com URL of the entry's repository and branch names."""
    owner_repository = urllib.parse.urlsplit(re.sub(r"\.git$", "", entry["scm_url"])).path.strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_repository}/{entry['scm_revision']}/"
    assert url.startswith(prefix), f"{url} is not a raw URL of {owner_repository} at {entry['scm_revision']}"
    return ROOT / url[len(prefix):]


def test_icon_and_screenshots_are_images_of_this_repository(entry, cmake):
    urls = [cmake["ICONURL"], *cmake["SCREENSHOTURLS"].split()]
    assert len(urls) >= 2, "an icon and at least one screenshot"
    for url in urls:
        head = _local_file_of(url, entry).read_bytes()[:8]
        assert head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8")), url
    icon = _local_file_of(cmake["ICONURL"], entry).read_bytes()
    assert (int.from_bytes(icon[16:20], "big"), int.from_bytes(icon[20:24], "big")) == (128, 128)


def test_contributors_use_the_index_format():
    cmakeValue = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]*)"\)',
                           (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")).group(1)
    names = cmakeValue.split(", ")
    assert all(CONTRIBUTOR.fullmatch(name) for name in names), cmakeValue
    assert PLACEHOLDER_CONTRIBUTORS not in names
    # The module's contributors (shown in Slicer's Help & Acknowledgement) name the same people.
    moduleTree = ast.parse((ROOT / "SSMSRRegistration" / "SSMSRRegistration.py").read_text(encoding="utf-8"))
    assigned = [ast.literal_eval(node.value) for node in ast.walk(moduleTree)
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and node.targets[0].attr == "contributors"]
    assert assigned == [names]


def test_one_description_only():
    assert not list(ROOT.glob("*.s4ext")), "the index takes the JSON entry; the build generates the .s4ext"
    assert sorted(path.name for path in ROOT.glob("*.json")) == [ENTRY_PATH.name]


def test_license_file_is_apache_2_0():
    present = [name for name in LICENSE_FILE_NAMES if (ROOT / name).is_file()]
    assert present == ["LICENSE"]
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_0_SHA256
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.MULTILINE)


def test_repository_is_under_the_size_limit():
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sizes = [(ROOT / name).stat().st_size for name in files.decode().split("\0") if name and (ROOT / name).is_file()]
    # The checker counts the clone with its .git; the tracked files alone must leave room for the history.
    assert sum(sizes) / 2 ** 20 < REPOSITORY_SIZE_LIMIT_MB / 2
