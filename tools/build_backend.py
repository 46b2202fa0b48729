"""A PEP 517 build backend in the standard library only, for the one-module casual_llm.

``pip install .`` and ``pip wheel .`` then need no network, no setuptools and no wheel
package: the wheel is a zip file with ``casual_llm.py`` and its ``.dist-info``. Metadata
comes from ``pyproject.toml``'s ``[project]`` table, the version from
``casual_llm.__version__`` (read as text, the module is not imported).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import tarfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "casual_llm.py"
SDIST_FILES = ("pyproject.toml", MODULE, "README.md", "CHANGELOG.md", "LICENSE",
               "test_casual_llm.py", "tools/build_backend.py")
SDIST_FOLDERS = ("examples",)  # the tests run them, so the sdist's tests need them
# 1980-01-01, the earliest date a zip can hold, unless SOURCE_DATE_EPOCH says otherwise.
_EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _load_toml(text: str) -> dict:
    try:
        import tomllib
    except ImportError:     # Python 3.10
        return _parse_toml_subset(text)
    return tomllib.loads(text)


def _parse_toml_subset(text: str) -> dict:
    """The TOML this project's pyproject.toml uses: ``[tables]``, ``key = value`` with
    strings, integers, booleans, (multi-line) arrays and inline tables, ``#`` comments."""
    import ast
    data: dict = {}
    table = data
    pending = ""
    for line in text.splitlines():
        stripped = _strip_comment(line).strip()
        if not stripped:
            continue
        if not pending and stripped.startswith("["):
            table = data
            for part in stripped.strip("[]").split("."):
                table = table.setdefault(part.strip().strip('"'), {})
            continue
        pending += " " + stripped
        if pending.count("[") > pending.count("]") or pending.count("{") > pending.count("}"):
            continue
        key, _, value = pending.partition("=")
        value = re.sub(r"([{,])\s*([A-Za-z0-9_-]+)\s*=", r'\1 "\2":', value.strip())
        value = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", value))
        table[key.strip().strip('"')] = ast.literal_eval(value)
        pending = ""
    return data


def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#":
            return line[:i]
    return line


def _project() -> dict:
    project = dict(_load_toml(_read("pyproject.toml"))["project"])
    match = re.search(r'^__version__ = "([^"]+)"', _read(MODULE), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no __version__ = \"...\" line in {MODULE}")
    project["version"] = match.group(1)
    return project


def _metadata(project: dict) -> str:
    """Core metadata 2.1 (PKG-INFO and METADATA)."""
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}",
             f"Version: {project['version']}", f"Summary: {project['description']}"]
    license_ = project.get("license")
    if isinstance(license_, dict):
        license_ = license_.get("text")
    if license_:
        lines.append(f"License: {license_}")
    if project.get("keywords"):
        lines.append("Keywords: " + ",".join(project["keywords"]))
    for author in project.get("authors", []):
        if "name" in author:
            lines.append(f"Author: {author['name']}")
        if "email" in author:
            lines.append(f"Author-email: {author['email']}")
    lines += [f"Classifier: {c}" for c in project.get("classifiers", [])]
    lines += [f"Project-URL: {k}, {v}" for k, v in project.get("urls", {}).items()]
    lines.append(f"Requires-Python: {project['requires-python']}")
    lines += [f"Requires-Dist: {d}" for d in project.get("dependencies", [])]
    lines.append("Description-Content-Type: text/markdown")
    return "\n".join(lines) + "\n\n" + _read(project["readme"])


def _names(project: dict) -> tuple[str, str]:
    """(``casual_llm``, ``casual_llm-0.5.0``): the normalised name and the file stem."""
    name = re.sub(r"[-_.]+", "_", project["name"]).lower()
    return name, f"{name}-{project['version']}"


def _entry_points(project: dict) -> str:
    scripts = project.get("scripts", {})
    if not scripts:
        return ""
    return "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())


def _dist_info(project: dict, stem: str) -> dict[str, bytes]:
    files = {
        f"{stem}.dist-info/METADATA": _metadata(project).encode(),
        f"{stem}.dist-info/WHEEL": (b"Wheel-Version: 1.0\nGenerator: casual_llm build_backend\n"
                                    b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        f"{stem}.dist-info/licenses/LICENSE": _read("LICENSE").encode(),
    }
    entry_points = _entry_points(project)
    if entry_points:
        files[f"{stem}.dist-info/entry_points.txt"] = entry_points.encode()
    return files


def _write_wheel(directory: str, contents: dict[str, bytes]) -> str:
    project = _project()
    _, stem = _names(project)
    contents = {**contents, **_dist_info(project, stem)}
    record = f"{stem}.dist-info/RECORD"
    lines = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}")
    contents[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    filename = f"{stem}-py3-none-any.whl"
    stamp = time.gmtime(_EPOCH)[:6]
    with zipfile.ZipFile(os.path.join(directory, filename), "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in contents.items():
            info = zipfile.ZipInfo(path, stamp)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return filename


# --- PEP 517 / PEP 660 hooks ---------------------------------------------------

def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    """Nothing: the standard library is enough."""
    return []


def get_requires_for_build_sdist(config_settings: dict | None = None) -> list[str]:
    """Nothing: the standard library is enough."""
    return []


def get_requires_for_build_editable(config_settings: dict | None = None) -> list[str]:
    """Nothing: the standard library is enough."""
    return []


def build_wheel(wheel_directory: str, config_settings: dict | None = None,
                metadata_directory: str | None = None) -> str:
    """The wheel: ``casual_llm.py`` at the root of site-packages, and its metadata."""
    return _write_wheel(wheel_directory, {MODULE: _read(MODULE).encode()})


def build_editable(wheel_directory: str, config_settings: dict | None = None,
                   metadata_directory: str | None = None) -> str:
    """An editable wheel: a ``.pth`` file that puts the checkout on ``sys.path``."""
    name, _ = _names(_project())
    return _write_wheel(wheel_directory, {f"_{name}_editable.pth": (ROOT + "\n").encode()})


def build_sdist(sdist_directory: str, config_settings: dict | None = None) -> str:
    """A source archive of what the wheel is built from, plus the docs and the tests."""
    project = _project()
    _, stem = _names(project)
    filename = f"{stem}.tar.gz"
    members = {f"{stem}/PKG-INFO": _metadata(project).encode()}
    folders = [f"{folder}/{entry}" for folder in SDIST_FOLDERS
               for entry in sorted(os.listdir(os.path.join(ROOT, folder)))
               if os.path.isfile(os.path.join(ROOT, folder, entry))]
    for name in (*SDIST_FILES, *folders):
        with open(os.path.join(ROOT, name), "rb") as f:
            members[f"{stem}/{name}"] = f.read()
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz",
                      format=tarfile.PAX_FORMAT) as tar:
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), _EPOCH, 0o644
            tar.addfile(info, io.BytesIO(data))
    return filename
