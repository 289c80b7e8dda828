"""Layout of the Slicer extension as the Extension Wizard makes it, and the Qt-free package's imports."""

from __future__ import annotations

import ast
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "slicer_extension"
MODULE = EXT / "HybridCT"
PACKAGE = EXT / "hybrid_ct_slicer"


def test_extension_cmake_metadata():
    text = (EXT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]*"\)', text), key
    assert "hybrid-ct/hybrid-ct" not in text and "example" not in text  # real URLs or none, no placeholders
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "NA")' in text
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(HybridCT)" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text
    assert (EXT / "HybridCT.png").is_file()


def test_module_cmake_lists_every_file():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text
    assert "${MODULE_NAME}.py" in text and "set(MODULE_NAME HybridCT)" in text
    listed = set(re.search(r"set\(HYBRID_CT_SLICER_PACKAGE_FILES(.*?)\)", text, re.S).group(1).split())
    on_disk = {p.name for p in PACKAGE.glob("*.py")}
    assert listed == on_disk, f"CMakeLists and hybrid_ct_slicer/ differ: {listed ^ on_disk}"
    assert "../hybrid_ct_slicer/contract.json" in text and "install(FILES ${HYBRID_CT_SLICER_CONTRACT}" in text
    for res in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert res in text
        assert (MODULE / res.replace("${MODULE_NAME}", "HybridCT")).is_file()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert (MODULE / "Testing" / "CMakeLists.txt").is_file()
    lib = set(re.search(r"set\(HYBRID_CT_LIB_FILES(.*?)\)", text, re.S).group(1).split())
    assert lib == {f"HybridCTLib/{p.name}" for p in (MODULE / "HybridCTLib").glob("*.py")}
    assert "${HYBRID_CT_LIB_FILES}" in text


def test_every_extension_file_under_500_lines():
    for path in [*MODULE.rglob("*.py"), *PACKAGE.glob("*.py")]:
        n = len(path.read_text(encoding="utf-8").splitlines())
        assert n < 500, f"{path.relative_to(EXT)} has {n} lines: split it by what it does"


def test_research_use_notice_in_the_panel():
    ui = (MODULE / "Resources" / "UI" / "HybridCT.ui").read_text(encoding="utf-8")
    assert ui.count("Research use only, not for diagnosis") == 2  # top of the panel and the results box
    source = (MODULE / "HybridCT.py").read_text(encoding="utf-8")
    assert "RESEARCH_NOTICE" in source and "#c0392b if positive" not in source


def test_icon_is_a_128px_png():
    for path in (MODULE / "Resources" / "Icons" / "HybridCT.png", EXT / "HybridCT.png"):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (128, 128)


def _ui_widgets():
    tree = ET.parse(MODULE / "Resources" / "UI" / "HybridCT.ui")
    root = tree.getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == "HybridCT"
    assert root.find("widget").get("class") == "qMRMLWidget"
    custom = {cw.findtext("class") for cw in root.iter("customwidget")}
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    for cls in set(widgets.values()):
        assert cls.startswith("Q") or cls in custom, f"{cls} is neither a Qt class nor declared custom"
    return widgets


def test_ui_has_the_controls_the_module_uses():
    widgets = _ui_widgets()
    required = {
        "serverUrlLineEdit": "QLineEdit", "connectButton": "QPushButton", "modelComboBox": "QComboBox",
        "runButton": "QPushButton", "progressBar": "QProgressBar", "classificationValueLabel": "QLabel",
        "burdenValueLabel": "QLabel", "gradeValueLabel": "QLabel", "energyValueLabel": "QLabel",
        "modelVersionValueLabel": "QLabel", "submitButton": "QPushButton", "strategyComboBox": "QComboBox",
        "nextSampleButton": "QPushButton", "trainButton": "QPushButton", "stopButton": "QPushButton",
        "trainStatusLabel": "QLabel", "metricLabel": "QLabel", "versionComboBox": "QComboBox",
        "rollbackButton": "QPushButton", "inputVolumeSelector": "qMRMLNodeComboBox",
        "segmentationSelector": "qMRMLNodeComboBox",
    }
    for name, cls in required.items():
        assert widgets.get(name) == cls, name
    used = set()
    for path in [MODULE / "HybridCT.py", *sorted((MODULE / "HybridCTLib").glob("*.py"))]:
        used |= set(re.findall(r"self\.ui\.(\w+)", path.read_text(encoding="utf-8")))
    assert {"researchNoticeLabel", "resultsNoticeLabel", "segmentationSelector"} <= used
    dynamic = {f"{k}ValueLabel" for k in ("classification", "burden", "grade", "energy", "modelVersion", "latency")}
    assert dynamic <= set(widgets)
    missing = used - set(widgets)
    assert not missing, f"HybridCT.py uses widgets missing from the .ui: {missing}"


def test_module_file_structure():
    tree = ast.parse((MODULE / "HybridCT.py").read_text(encoding="utf-8"))
    bases = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert bases["HybridCT"] == ["ScriptedLoadableModule"]
    assert bases["HybridCTWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["HybridCTLogic"][0] == "ScriptedLoadableModuleLogic"  # + the package's ModuleLogic
    assert bases["HybridCTTest"] == ["ScriptedLoadableModuleTest"]
    source = (MODULE / "HybridCT.py").read_text(encoding="utf-8")
    assert 'slicer.util.loadUI(self.resourcePath("UI/HybridCT.ui"))' in source
    assert "qt.QSettings()" in source and "SETTINGS_KEY_SERVER_URL" in source


def test_no_folder_named_slicer_on_the_test_paths():
    """`import slicer` (slicer-core) imports every module of any folder named slicer/ on sys.path."""
    for base in (ROOT, ROOT / "tests", EXT, MODULE):
        assert not (base / "slicer").exists(), base / "slicer"


def test_qt_free_package_imports_with_what_slicer_ships():
    """As in Slicer's Python with nothing installed: numpy, requests and SimpleITK (Slicer ships them), but
    no monailabel, hybrid_ct, nibabel, requests_toolbelt, and no qt, vtk or slicer outside mrml.py."""
    code = r"""
import importlib, sys
BLOCKED = {"monailabel", "nibabel", "torch", "qt", "ctk", "vtk", "slicer", "PIL", "matplotlib", "hybrid_ct",
           "pydicom", "requests_toolbelt", "nrrd"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
for m in ("hybrid_ct_slicer", "hybrid_ct_slicer.client", "hybrid_ct_slicer.segments", "hybrid_ct_slicer.results",
          "hybrid_ct_slicer.settings", "hybrid_ct_slicer.imageio", "hybrid_ct_slicer.workflow",
          "hybrid_ct_slicer.testdata", "hybrid_ct_slicer.identity", "hybrid_ct_slicer.jobs",
          "hybrid_ct_slicer.policy", "hybrid_ct_slicer.mockserver"):
    importlib.import_module(m)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(EXT), timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_extension_folder_is_a_repository_root():
    """Issue 17 packaging: README and Apache-2.0 LICENSE in the extension folder, module dependencies,
    a parameter node, and the export script makes the folder the root of its own repository."""
    assert "Apache License" in (EXT / "LICENSE").read_text(encoding="utf-8") and "Version 2.0" in (EXT / "LICENSE").read_text(encoding="utf-8")
    readme = (EXT / "README.md").read_text(encoding="utf-8")
    assert "Hybrid CT" in readme and "LICENSE" in readme
    source = (MODULE / "HybridCT.py").read_text(encoding="utf-8")
    assert 'self.parent.dependencies = ["Segmentations", "SegmentEditor"]' in source
    assert "saveSelection" in source and "getParameterNode" in (PACKAGE / "logic.py").read_text(encoding="utf-8")


def test_export_script_makes_a_standalone_repository(tmp_path):
    import shutil

    if shutil.which("git") is None:
        import pytest
        pytest.skip("git is not installed")
    target = tmp_path / "SlicerHybridCT"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "export_slicer_extension.sh"), str(target)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for rel in ("CMakeLists.txt", "README.md", "LICENSE", "HybridCT.png", "HybridCT/HybridCT.py",
                "HybridCT/Resources/UI/HybridCT.ui", "hybrid_ct_slicer/contract.json", ".git"):
        assert (target / rel).exists(), rel
    log = subprocess.run(["git", "-C", str(target), "log", "--oneline"], capture_output=True, text=True)
    assert log.returncode == 0 and log.stdout.strip()
    status = subprocess.run(["git", "-C", str(target), "status", "--porcelain"], capture_output=True, text=True)
    assert status.stdout.strip() == "", "files left out of the exported repository"
    assert not list(target.rglob("__pycache__"))
