"""The GBMMassEffect scripted module under pytest: real MRML nodes from slicer-core, the
project's stand-in (Testing/slicer_stub) for what slicer-core lacks, the real solver process.

GBMMassEffectTest (the module's own self-test, unchanged from what Slicer runs) drives the
Logic end to end on a 32³ synthetic case; the other tests check what loading the module
file outside Slicer gives, the parameter node, the job.json of a calibration, the
segment export, and the grid-transform convention of the displacement field.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs the PyPI package slicer-core")

import slicer_stub  # noqa: E402  (Testing/slicer_stub)

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "GBMMassEffect" / "GBMMassEffect.py"


@pytest.fixture(scope="module")
def gbm():
    slicer_stub.install()
    module, instance = slicer_stub.loadModuleFile(MODULE_FILE)
    return module, instance


@pytest.fixture
def selfTest(gbm):
    module, _ = gbm
    test = module.GBMMassEffectTest()
    test.setUp()
    return test


def test_module_loads_outside_slicer(gbm):
    module, instance = gbm
    import slicer
    assert instance.parent.title == "GBM Mass Effect"
    assert "Subramanian" in instance.parent.helpText and "MICCAI" in instance.parent.helpText
    assert instance.parent.acknowledgementText
    assert instance.parent.categories
    assert "GBMMassEffect" in slicer.selfTests
    assert os.path.isfile(instance.resourcePath("UI/GBMMassEffect.ui"))
    assert os.path.isfile(instance.resourcePath("Icons/GBMMassEffect.png"))
    assert "cupy" in pathlib.Path(instance.resourcePath("requirements.txt")).read_text()
    for name in ("GBMMassEffectWidget", "GBMMassEffectLogic", "GBMMassEffectTest", "GBMMassEffectParameterNode"):
        assert hasattr(module, name)


def test_parameter_node(gbm):
    module, _ = gbm
    import slicer
    slicer.mrmlScene.Clear()
    logic = module.GBMMassEffectLogic()
    p = logic.getParameterNode()
    assert p.resolution == 128 and p.numberOfAtlases == 4 and p.device == module.Device.AUTO
    assert p.useBundledAtlases
    # the GUI path sends no solver options: the paper's settings
    import inspect
    assert inspect.signature(logic.process).parameters["solverOptions"].default is None
    p.resolution = 64
    p.device = module.Device.CPU
    with pytest.raises(ValueError):
        p.resolution = 100
    again = logic.getParameterNode()  # singleton, values persist in the scene
    assert again.resolution == 64 and again.device == module.Device.CPU
    assert again.parameterNode.GetAttribute("ModuleName") == "GBMMassEffect"
    assert "T1" in module.GBMMassEffectLogic.missingInputs(p)
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    p.inputVolume = volume
    assert "segmentation" in module.GBMMassEffectLogic.missingInputs(p)


def _patientCase(module, test):
    """T1-like volume and a tumor segmentation (core, edema) on the test geometry."""
    import slicer
    labels = test.makeLabelVolume()
    arr = slicer.util.arrayFromVolume(labels).astype(np.float32)
    t1 = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    slicer.util.updateVolumeFromArray(t1, arr * 100.0)
    t1.CopyOrientation(labels)
    n = arr.shape[0]
    k, j, i = np.mgrid[0:n, 0:n, 0:n]
    r = np.sqrt((i - 14) ** 2 + (j - 17) ** 2 + (k - 15) ** 2)
    tumor = np.zeros(arr.shape, np.uint8)
    tumor[r < 6] = 2
    tumor[r < 3] = 1
    tumorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tumor")
    slicer.util.updateVolumeFromArray(tumorNode, tumor)
    tumorNode.CopyOrientation(labels)
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(t1)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(tumorNode, seg)
    ids = [seg.GetSegmentation().GetNthSegmentID(x) for x in range(2)]
    return t1, seg, ids, tumor


def test_calibration_job_inputs(gbm, selfTest, tmp_path):
    """process() writes the T1, the BraTS tumor labels (core 1, edema 2) with the T1's
    geometry, and job.json per ARCHITECTURE.md, then starts `calibrate --job DIR`."""
    module, _ = gbm
    import slicer
    logic = module.GBMMassEffectLogic()
    t1, seg, (coreId, edemaId), tumor = _patientCase(module, selfTest)
    folder = logic.createJobFolder("calibrate")
    path = logic.writeTumorLabels(seg, t1, coreId, edemaId, path=os.path.join(folder, "input", "tumor.nrrd"))
    back = logic.readVolume(path, "back", "vtkMRMLLabelMapVolumeNode")
    selfTest.assertSameGeometry(back, t1)
    got = slicer.util.arrayFromVolume(back)
    np.testing.assert_array_equal(got, np.where(tumor == 1, 1, np.where(tumor == 2, 2, 0)))
    job = logic.calibrationJobDict(folder, "t1.nrrd", path, None, "bundled", 128, "cpu", 3, 7)
    assert job == {"command": "calibrate", "t1": "t1.nrrd", "tumor_labels": path,
                   "tumor_label_values": {"necrotic": 1, "edema": 2, "enhancing": 4}, "tissue_labels": None,
                   "tissue_label_values": {"gm": 5, "wm": 6, "vt": 7, "csf": 8}, "atlas_set": "bundled",
                   "grid": 128, "device": "cpu", "n_atlases": 3, "seed": 7, "out": os.path.join(folder, "out"),
                   "options": {}}
    with pytest.raises(ValueError, match="resolution"):
        logic.calibrationJobDict(folder, "a", "b", grid=33)
    assert logic.calibrationJobDict(folder, "a", "b", grid=32)["grid"] == 32  # tests run at 32³
    with pytest.raises(ValueError, match="device"):
        logic.calibrationJobDict(folder, "a", "b", device="tpu")
    with pytest.raises(ValueError, match="core"):
        logic.writeTumorLabels(seg, t1, "")
    with pytest.raises(ValueError, match="solver options"):
        logic.calibrationJobDict(folder, "a", "b", solverOptions={"s4": {}})

    # the real calibrate entry point: start it and check what it was given
    cheap = module.GBMMassEffectTest.CHEAP_OPTIONS
    started = logic.process(t1, seg, coreId, edemaId, resolution=64, device="cpu", numberOfAtlases=2,
                            keepJobFolder=True, solverOptions=cheap)
    try:
        with open(os.path.join(started.folder, "job.json")) as f:
            written = json.load(f)
        assert written["grid"] == 64 and written["n_atlases"] == 2 and written["device"] == "cpu"
        assert os.path.isfile(written["t1"]) and os.path.isfile(written["tumor_labels"])
        assert started.args[-3:] == ["calibrate", "--job", started.folder]
        assert written["options"] == cheap and written["out"] == os.path.join(started.folder, "out")
        assert written["tumor_labels"].startswith(started.folder)
        # the solver reads this job.json as it is: same keys, values, label values and out
        from GBMMassEffectLib.calibrate import DEFAULT_TISSUE_VALUES, DEFAULT_TUMOR_VALUES, CalibrateJob
        parsed = CalibrateJob.from_job_dir(started.folder)
        parsed.validate()
        full = parsed.to_dict()
        assert set(written) <= set(full)  # no key the solver does not know (it would refuse them)
        assert {k: full[k] for k in written} == written
        assert full["predict_times"] == [] and full["atlases"] is None  # the rest: solver defaults
        assert parsed.tumor_label_values == DEFAULT_TUMOR_VALUES
        assert parsed.tissue_label_values == DEFAULT_TISSUE_VALUES
        assert parsed.s3_options().maxiter == 2 and parsed.s3_options().hessian is False
        assert parsed.s1_options().cosamp_iterations == 1
        t1back = logic.readVolume(written["t1"], "t1back")
        selfTest.assertSameGeometry(t1back, t1)
    finally:
        logic.cancelJob(started)
        logic.waitForJob(started, timeout=60)
        import shutil
        shutil.rmtree(started.folder, ignore_errors=True)


def test_displacement_transform_convention(gbm, tmp_path):
    """Pin the grid-transform convention: an ITK displacement file of constant LPS vector
    (1, 2, 3) mm is the FromParent transform p -> p + (-1, -2, 3) in RAS."""
    import SimpleITK as sitk
    module, _ = gbm
    arr = np.zeros((6, 7, 8, 3), np.float32)
    arr[...] = (1.0, 2.0, 3.0)
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetSpacing((2.0, 3.0, 4.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    path = str(tmp_path / "displacement.nrrd")
    sitk.WriteImage(img, path)
    node = module.GBMMassEffectLogic.readDisplacementTransform(path, "u")
    p = [-16.0, -29.0, 41.0]  # RAS of LPS (16, 29, 41), inside the grid
    q = node.GetTransformFromParent().TransformPoint(p)
    np.testing.assert_allclose(np.subtract(q, p), [-1.0, -2.0, 3.0], atol=1e-5)
    # the module loads the solver's u with scale -1: p -> p - R u(p)
    negated = module.GBMMassEffectLogic.readDisplacementTransform(path, "minus u", scale=-1.0)
    q = negated.GetTransformFromParent().TransformPoint(p)
    np.testing.assert_allclose(np.subtract(q, p), [1.0, 2.0, -3.0], atol=1e-5)


def test_parameter_rows(selfTest):
    selfTest.test_ParameterRows()


def test_end_to_end_calibrate(selfTest):
    """GBMMassEffectTest.test_CalibrateEndToEnd: `calibrate` as a process at n = 32, one
    atlas, cut-down solver settings; outputs on the T1's geometry, table rows."""
    selfTest.test_CalibrateEndToEnd()


def test_end_to_end_simulate(selfTest):
    """GBMMassEffectTest.test_SimulateEndToEnd: the real solver process at n = 32."""
    selfTest.test_SimulateEndToEnd()


def test_cancel(selfTest):
    selfTest.test_Cancel()


def test_failure(selfTest):
    selfTest.test_Failure()


def test_sample_case(selfTest):
    selfTest.test_SampleCase()


def test_sample_data_registration(gbm, monkeypatch):
    """registerSampleData registers a generated (not downloaded) source whose custom
    downloader builds the synthetic patient; the category call is guarded (Slicer < 5.12)."""
    import sys
    import types
    module, _ = gbm
    calls = []

    class Logic:  # SampleDataLogic of Slicer 5.10: no registerCustomSampleDataCategory
        @staticmethod
        def registerCustomSampleDataSource(**kwargs):
            calls.append(kwargs)

    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=Logic))
    module.registerSampleData()
    assert len(calls) == 1
    source = calls[0]
    assert source["sampleName"] == module.SAMPLE_NAME and source["category"] == "GBMMassEffect"
    assert callable(source["customDownloader"])
    assert not any(str(u).startswith("http") for u in source["uris"])
    assert os.path.isfile(source["thumbnailFileName"])


class _Widget:
    """Minimal stand-ins for the .ui widgets the Widget's state code touches."""

    def __init__(self, **kw):
        self.__dict__.update(enabled=False, text="", toolTip="", visible=True, value=0, **kw)


class _Log:
    def __init__(self):
        self.lines = []

    def toPlainText(self):
        return "\n".join(self.lines)

    def clear(self):
        self.lines = []

    def appendPlainText(self, text):
        self.lines.append(text)


def test_widget_states(gbm):
    """Calibrate turns into Cancel while a job runs; progress bar and status text follow
    the process's JSON lines (the Widget's state code, without Qt widgets)."""
    import types
    import slicer
    module, _ = gbm
    slicer.mrmlScene.Clear()
    widget = module.GBMMassEffectWidget.__new__(module.GBMMassEffectWidget)
    widget.ui = types.SimpleNamespace(applyButton=_Widget(), progressBar=_Widget(), statusLabel=_Widget(),
                                      logTextEdit=_Log())
    widget.logic = module.GBMMassEffectLogic()
    widget._parameterNode = widget.logic.getParameterNode()
    widget._job = None
    widget._checkCanApply()
    assert widget.ui.applyButton.text == "Calibrate" and not widget.ui.applyButton.enabled
    assert "T1" in widget.ui.applyButton.toolTip

    job = module.GBMMassEffectJob("calibrate", "/nonexistent", [], {}, None)
    widget._job = job
    widget._checkCanApply()
    assert widget.ui.applyButton.text == "Cancel" and widget.ui.applyButton.enabled
    job.fraction, job.stage, job.message = 0.42, "S.3", "atlas 2 of 4"
    widget._onJobEvent(job, {"event": "progress", "stage": "S.3", "fraction": 0.42, "message": "atlas 2 of 4"})
    assert widget.ui.progressBar.value == 42 and widget.ui.progressBar.visible
    assert widget.ui.statusLabel.text == "S.3: atlas 2 of 4"
    widget._onJobEvent(job, {"event": "log", "message": "a solver line"})
    assert widget.ui.logTextEdit.lines == ["a solver line"]
    job.cancelRequested = True
    widget._checkCanApply()
    assert widget.ui.applyButton.text == "Cancelling..."
    job.state = job.CANCELLED
    widget._onJobFinished(job)
    assert widget.ui.applyButton.text == "Calibrate" and widget.ui.statusLabel.text == "Cancelled"
    assert not widget.ui.progressBar.visible


def test_runTest_covers_every_test_method(gbm):
    """ctest py_GBMMassEffect (Slicer) calls runTest: it must run every test_* method that
    pytest runs here one by one."""
    import inspect
    import re
    module, _ = gbm
    cls = module.GBMMassEffectTest
    methods = {name for name in dir(cls) if name.startswith("test_")}
    called = set(re.findall(r"self\.(test_\w+)\(\)", inspect.getsource(cls.runTest)))
    assert methods and called == methods
