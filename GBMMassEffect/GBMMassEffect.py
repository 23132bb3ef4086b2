"""GBMMassEffect: calibrate a glioblastoma growth model with mass effect in one click.

Module, parameter node, Widget, Logic and Test in the order of Slicer's scripted-module
template. The Logic drives the solver process ``PythonSlicer -m GBMMassEffectLib`` through
the qt-free ``GBMMassEffectLib.runner.ProcessRunner`` (ARCHITECTURE.md "The scripted
module", "The process boundary"); the Widget only polls it from a QTimer.
"""
import enum
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Annotated, Optional

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _libraryParentFolder():
    """The folder holding the GBMMassEffectLib package: next to this file in an installed
    extension (WITH_SUBDIR), one level up in the source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "GBMMassEffectLib", "__init__.py")):
            return folder
    import importlib.util
    spec = importlib.util.find_spec("GBMMassEffectLib")
    if spec is None or not spec.origin:
        raise RuntimeError("GBMMassEffectLib (the solver package) was not found next to the module")
    return os.path.dirname(os.path.dirname(spec.origin))


if _libraryParentFolder() not in sys.path:
    sys.path.insert(0, _libraryParentFolder())

from GBMMassEffectLib.aggregate import PARAMETER_SYMBOLS  # noqa: E402  (report keys → the paper's symbols)
from GBMMassEffectLib.runner import ProcessRunner, pythonModuleCommand  # noqa: E402

PAPER_CITATION = (
    "S. Subramanian, K. Scheufele, N. Himthani, G. Biros. Multiatlas calibration of biophysical "
    "brain tumor growth models with mass effect. Medical Image Computing and Computer Assisted "
    "Intervention (MICCAI) 2020.")


#
# GBMMassEffect
#

class GBMMassEffect(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GBM Mass Effect")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["GBMMassEffect developers"]
        self.parent.helpText = _(
            "Calibrates a glioblastoma growth model with mass effect (tumor migration kappa, "
            "proliferation rho, mass-effect strength gamma) from one T1 MRI and a tumor "
            "segmentation against a set of healthy brain atlases, and shows the predicted tumor "
            "and the tissue displacement (mass effect, mm) as overlays.<br><br>"
            "Method: ") + PAPER_CITATION + "<br>" + _(
            "See <a href=\"https://github.com/GBMMassEffect/GBMMassEffect\">the documentation</a>.")
        self.parent.acknowledgementText = _(
            "Implements the multiatlas mass-effect calibration of Subramanian et al. (MICCAI 2020) "
            "in Python (numpy/scipy, CuPy optional). Module layout follows the 3D Slicer scripted "
            "module template (Jean-Christophe Fillion-Robin, Kitware; Andras Lasso, PerkLab; "
            "Steve Pieper, Isomics).")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a synthetic patient made from the bundled atlas (nothing is downloaded)
#

SAMPLE_NAME = "GBMSyntheticPatient"


def registerSampleData():
    import SampleData
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer >= 5.12
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("GBMMassEffect")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="GBMMassEffect",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, "GBMMassEffect.png"),
        # generated on the user's machine from the bundled atlas by a short forward run
        uris=["generated:bundled-atlas"],
        fileNames=["GBMSyntheticPatient.nrrd"],
        nodeNames=["GBMSyntheticPatient_T1"],
        customDownloader=lambda source: GBMMassEffectLogic().createSyntheticPatient(),
    )


#
# Parameter node
#

class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


RESOLUTIONS = (64, 128, 160, 256)


@parameterNodeWrapper
class GBMMassEffectParameterNode:
    """inputVolume: patient T1. segmentation: tumor segments (coreSegmentId = tumor core or
    necrotic, enhancingSegmentId optional, edemaSegmentId). tissueSegmentation: optional
    wm/gm/ventricles/csf segments (matched by name). Atlas set: bundled or atlasFolder."""
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    coreSegmentId: str = ""
    enhancingSegmentId: str = ""
    edemaSegmentId: str = ""
    tissueSegmentation: vtkMRMLSegmentationNode
    useBundledAtlases: bool = True
    atlasFolder: str = ""
    numberOfAtlases: Annotated[int, WithinRange(1, 32)] = 4
    resolution: Annotated[int, Choice(list(RESOLUTIONS))] = 128
    device: Device = Device.AUTO
    keepJobFolder: bool = False


#
# Widget
#

class GBMMassEffectWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: Calibrate turns into Cancel while a job runs; a QTimer polls the job."""

    POLL_MSEC = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._pollTimer = None

    def setup(self) -> None:
        import qt
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GBMMassEffect.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GBMMassEffectLogic()
        self.logic.logCallback = self.addLog

        for value in RESOLUTIONS:
            self.ui.resolutionComboBox.addItem(str(value), value)
        self.ui.resolutionComboBox.connect("currentIndexChanged(int)", self._onResolutionChanged)
        # Segment pickers: parameterNodeWrapper has no connector for segment selectors.
        self.ui.coreSegmentSelector.connect("currentSegmentChanged(QString)",
                                            lambda sid: self._setParameter("coreSegmentId", sid))
        self.ui.enhancingSegmentSelector.connect("currentSegmentChanged(QString)",
                                                 lambda sid: self._setParameter("enhancingSegmentId", sid))
        self.ui.edemaSegmentSelector.connect("currentSegmentChanged(QString)",
                                             lambda sid: self._setParameter("edemaSegmentId", sid))
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._onSegmentationChanged)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.sampleButton.connect("clicked(bool)", self.onSampleButton)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MSEC)
        self._pollTimer.connect("timeout()", self._onPoll)
        self._setProgress(None, "")
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None and self._job.running:
            self.logic.cancelJob(self._job)
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first
        if not self._parameterNode.segmentation:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if first:
                self._parameterNode.segmentation = first

    def setParameterNode(self, inputParameterNode: Optional[GBMMassEffectParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._updateSegmentPickers()
            self._checkCanApply()

    def _setParameter(self, name, value) -> None:
        if self._parameterNode is not None:
            setattr(self._parameterNode, name, value or "")

    def _onSegmentationChanged(self, node) -> None:
        for selector in (self.ui.coreSegmentSelector, self.ui.enhancingSegmentSelector, self.ui.edemaSegmentSelector):
            selector.setCurrentNode(node)

    def _onResolutionChanged(self, index) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.resolution = int(self.ui.resolutionComboBox.itemData(index))

    def _updateSegmentPickers(self) -> None:
        p = self._parameterNode
        for selector, sid in ((self.ui.coreSegmentSelector, p.coreSegmentId),
                              (self.ui.enhancingSegmentSelector, p.enhancingSegmentId),
                              (self.ui.edemaSegmentSelector, p.edemaSegmentId)):
            wasBlocked = selector.blockSignals(True)
            selector.setCurrentNode(p.segmentation)
            selector.setCurrentSegmentID(sid)
            selector.blockSignals(wasBlocked)
        self.ui.resolutionComboBox.setCurrentIndex(max(0, self.ui.resolutionComboBox.findData(p.resolution)))

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._job is not None and self._job.running:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.text = _("Cancelling...") if self._job.cancelRequested else _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the calibration (no result is loaded)")
            return
        self.ui.applyButton.text = _("Calibrate")
        problem = GBMMassEffectLogic.missingInputs(self._parameterNode) if self._parameterNode else _("No parameter node")
        self.ui.applyButton.enabled = not problem
        self.ui.applyButton.toolTip = problem or _("Calibrate the growth model and load the predicted tumor and mass effect")

    # -- run ------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._job is not None and self._job.running:
            self.logic.cancelJob(self._job)
            self._checkCanApply()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the calibration."), waitCursor=True):
            self.logic.setupPythonRequirements(p.device.value)
            self.ui.logTextEdit.clear()
            self._job = self.logic.processUsingParameterNode(p, eventCallback=self._onJobEvent)
            self._setProgress(0.0, _("Starting..."))
            self._pollTimer.start()
        self._checkCanApply()

    def _onPoll(self) -> None:
        if self._job is None:
            self._pollTimer.stop()
            return
        if self.logic.pollJob(self._job):
            self._pollTimer.stop()
            self._onJobFinished(self._job)

    def _onJobEvent(self, job, event) -> None:
        kind = event.get("event")
        if kind == "progress":
            self._setProgress(job.fraction, job.statusText)
        elif kind == "log":
            self.addLog(event.get("message", ""))

    def _onJobFinished(self, job) -> None:
        if job.state == GBMMassEffectJob.COMPLETED:
            self._setProgress(1.0, _("Done: {summary}").format(summary=job.summary()))
        elif job.state == GBMMassEffectJob.CANCELLED:
            self._setProgress(None, _("Cancelled"))
        else:
            self._setProgress(None, _("Failed: {error}").format(error=job.errorMessage))
            slicer.util.errorDisplay(_("Calibration failed:\n{error}").format(error=job.errorMessage))
        self._checkCanApply()

    def _setProgress(self, fraction, text) -> None:
        self.ui.progressBar.visible = fraction is not None
        if fraction is not None:
            self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = text

    def addLog(self, text) -> None:
        if len(self.ui.logTextEdit.toPlainText()) > 256 * 1024:
            self.ui.logTextEdit.clear()
        self.ui.logTextEdit.appendPlainText(text)

    def onSampleButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to create the sample case."), waitCursor=True):
            volume, segmentation = self.logic.createSyntheticPatient()
            p = self._parameterNode
            p.inputVolume, p.segmentation = volume, segmentation
            seg = segmentation.GetSegmentation()
            p.coreSegmentId = seg.GetSegmentIdBySegmentName("necrotic")
            p.enhancingSegmentId = seg.GetSegmentIdBySegmentName("enhancing")
            p.edemaSegmentId = seg.GetSegmentIdBySegmentName("edema")
            self._updateSegmentPickers()


#
# Logic
#

class GBMMassEffectJob:
    """One solver run: its folder, process runner, progress and, at the end, the loaded nodes."""

    RUNNING, COMPLETED, FAILED, CANCELLED = "running", "completed", "failed", "cancelled"

    def __init__(self, kind, folder, args, env, referenceVolume, eventCallback=None, keepFolder=False):
        self.kind = kind
        self.folder = folder
        self.outputFolder = os.path.join(folder, "out")
        self.args = args
        self.env = env
        self.referenceVolume = referenceVolume
        self.eventCallback = eventCallback
        self.keepFolder = keepFolder
        self.runner = None
        self.state = self.RUNNING
        self.cancelRequested = False
        self.fraction = 0.0
        self.stage = ""
        self.message = ""
        self.errorMessage = ""
        self.returncode = None
        self.report = None
        self.nodes = {}
        self.startTime = time.time()
        self.elapsed = None

    @property
    def running(self):
        return self.state == self.RUNNING

    @property
    def statusText(self):
        return f"{self.stage}: {self.message}" if self.stage else self.message

    def summary(self):
        report = self.report or {}
        maxU = report.get("max_u_mm")
        if maxU is None and isinstance(report.get("mean"), dict):
            maxU = report["mean"].get("max_u_mm")  # calibration: the mean over the kept atlases
        text = _("{seconds:.0f} s").format(seconds=self.elapsed or 0.0)
        if maxU is not None:
            text += _(", max displacement {mm:.1f} mm").format(mm=maxU)
        notes = self.notes()
        if notes:
            text += _(", {count} note(s) in the log").format(count=len(notes))
        return text

    def notes(self):
        """report.json's notes: parameters left on a bound, inputs read a particular way
        (e.g. no edema), poor registrations; the Logic logs each when the job completes."""
        notes = (self.report or {}).get("notes") or []
        return [str(n) for n in notes] if isinstance(notes, list) else [str(notes)]


class GBMMassEffectLogic(ScriptedLoadableModuleLogic):
    """Writes inputs, runs the solver process, loads its outputs. No GUI code.

    Main path: ``process(...)`` (calibrate job, job.json per ARCHITECTURE.md). Scripted
    forward runs and the sample case use ``simulate(...)``. Both return a
    ``GBMMassEffectJob``; ``pollJob`` advances it (from a QTimer or a wait loop),
    ``cancelJob`` stops it, and with ``waitForCompletion=True`` they block until done.
    """

    JOB_CALIBRATE = "calibrate"
    JOB_SIMULATE = "simulate"
    BRATS_NECROTIC, BRATS_EDEMA, BRATS_ENHANCING = 1, 2, 4
    TISSUE_LABELS = {"gm": 5, "wm": 6, "vt": 7, "csf": 8}
    TISSUE_NAMES = {"wm": ("wm", "white"), "gm": ("gm", "gray", "grey"), "vt": ("vt", "ventric"),
                    "csf": ("csf", "cerebrospinal")}
    TUMOR_COLOR_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLPETProceduralColorNodePET-Heat",
                       "vtkMRMLColorTableNodeWarm1")
    DISPLACEMENT_COLOR_IDS = ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeCool1",
                              "vtkMRMLColorTableNodeRainbow")
    TUMOR_THRESHOLD = 0.1
    DISPLACEMENT_THRESHOLD_MM = 0.5

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self.pythonExecutable = None  # default: PythonSlicer in Slicer, sys.executable elsewhere
        self.graceSeconds = 5.0

    def getParameterNode(self):
        return GBMMassEffectParameterNode(super().getParameterNode())

    def log(self, text):
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # -- checks and dependencies -----------------------------------------------------
    @staticmethod
    def missingInputs(p) -> str:
        """'' when the parameter node is complete, else what is missing (for the button)."""
        if not p.inputVolume:
            return _("Select the patient T1 volume")
        if not p.segmentation:
            return _("Select the tumor segmentation")
        if not p.coreSegmentId:
            return _("Select the tumor core (or necrotic) segment")
        if not p.useBundledAtlases and not os.path.isdir(str(p.atlasFolder)):
            return _("Select an atlas folder or use the bundled atlases")
        return ""

    @staticmethod
    def gpuAvailable() -> bool:
        if shutil.which("nvidia-smi"):
            return True
        return os.path.exists("/proc/driver/nvidia/version")

    def setupPythonRequirements(self, device="auto", requester="GBMMassEffect"):
        """Install CuPy on first use, only for a GPU run on a machine with an NVIDIA GPU.
        Slicer bundles numpy, scipy and SimpleITK: they are never pip-installed."""
        if device == "cpu" or not self.gpuAvailable():
            return False
        try:
            import cupy  # noqa: F401  (installed already)
            return False
        except ImportError:
            pass
        requirementsPath = os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")
        if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):  # Slicer >= 5.12
            requirements = slicer.packaging.load_requirements(requirementsPath)
            slicer.packaging.pip_ensure(requirements, requester=requester)
        elif not slicer.app.testingEnabled():
            with open(requirementsPath) as f:
                packages = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            slicer.util.pip_install(packages)
        return True

    # -- inputs ----------------------------------------------------------------------
    def createJobFolder(self, kind) -> str:
        base = getattr(slicer.app, "temporaryPath", None) or tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=f"GBMMassEffect-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=base)
        os.makedirs(os.path.join(folder, "input"))
        return folder

    @staticmethod
    def writeNode(node, path) -> str:
        """Write a volume (or labelmap) node with a storage node, uncompressed for speed."""
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(path)
        storage.UseCompressionOff()
        if not storage.WriteData(node):
            raise RuntimeError(f"writing {node.GetName()} to {path} failed")
        storage.UnRegister(None)
        return path

    @staticmethod
    def _segmentMask(segmentationNode, segmentId, referenceVolume):
        """Binary numpy mask (K, J, I) of one segment on the reference volume's grid."""
        import numpy as np
        if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise ValueError(f"segment {segmentId!r} is not in {segmentationNode.GetName()}")
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gbm_export__")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmap, referenceVolume):
                raise RuntimeError(f"exporting segment {segmentId!r} failed")
            return np.array(slicer.util.arrayFromVolume(labelmap)) > 0
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)

    def _writeLabelArray(self, array, referenceVolume, path):
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gbm_labels__")
        try:
            slicer.util.updateVolumeFromArray(labelmap, array)
            labelmap.CopyOrientation(referenceVolume)
            return self.writeNode(labelmap, path)
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)

    def writeTumorLabels(self, segmentationNode, referenceVolume, coreSegmentId, edemaSegmentId="",
                         enhancingSegmentId="", path=None) -> str:
        """BraTS label map on the T1 grid: core/necrotic 1, edema 2, enhancing 4
        (core and enhancing win over edema)."""
        import numpy as np
        if not coreSegmentId:
            raise ValueError("the tumor core (or necrotic) segment is required")
        core = self._segmentMask(segmentationNode, coreSegmentId, referenceVolume)
        labels = np.zeros(core.shape, np.uint8)
        if edemaSegmentId:
            labels[self._segmentMask(segmentationNode, edemaSegmentId, referenceVolume)] = self.BRATS_EDEMA
        if enhancingSegmentId:
            labels[self._segmentMask(segmentationNode, enhancingSegmentId, referenceVolume)] = self.BRATS_ENHANCING
        labels[core] = self.BRATS_NECROTIC
        if not core.any():
            raise ValueError("the tumor core segment is empty on the T1 grid")
        return self._writeLabelArray(labels, referenceVolume, path)

    def writeTissueLabels(self, tissueSegmentation, referenceVolume, path) -> str:
        """wm 6, gm 5, vt 7, csf 8 from segments matched by name."""
        import numpy as np
        segmentation = tissueSegmentation.GetSegmentation()
        labels = None
        found = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            name = segmentation.GetSegment(segmentId).GetName().lower()
            for tissue, keys in self.TISSUE_NAMES.items():
                if any(name == k or name.startswith(k) for k in keys):
                    mask = self._segmentMask(tissueSegmentation, segmentId, referenceVolume)
                    labels = np.zeros(mask.shape, np.uint8) if labels is None else labels
                    labels[mask] = self.TISSUE_LABELS[tissue]
                    found.append(tissue)
                    break
        if not {"wm", "gm"} <= set(found):
            raise ValueError("the tissue segmentation needs segments named white matter/wm and gray matter/gm "
                             f"(found: {', '.join(found) or 'none'})")
        return self._writeLabelArray(labels, referenceVolume, path)

    SOLVER_OPTION_GROUPS = ("s1", "s3", "registration")

    @classmethod
    def calibrationJobDict(cls, folder, t1Path, tumorLabelsPath, tissueLabelsPath=None, atlasSet="bundled",
                           grid=128, device="auto", numberOfAtlases=4, seed=0, solverOptions=None) -> dict:
        """The job.json of ``calibrate --job DIR`` (ARCHITECTURE.md "The process boundary";
        keys of GBMMassEffectLib.calibrate.CalibrateJob). solverOptions: {"s1": {...},
        "s3": {...}, "registration": {...}} overrides of the paper's settings (the GUI sends
        none; tests and scripts send cheap ones); the solver checks the names and values."""
        if int(grid) != grid or grid < 16 or int(grid) % 2:
            raise ValueError(f"resolution must be an even grid size of at least 16 (the GUI offers "
                             f"{', '.join(map(str, RESOLUTIONS))}), got {grid}")
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
        if int(numberOfAtlases) < 1:
            raise ValueError("number of atlases must be at least 1")
        options = {} if solverOptions is None else solverOptions
        if not isinstance(options, dict) or set(options) - set(cls.SOLVER_OPTION_GROUPS) or not all(
                isinstance(v, dict) for v in options.values()):
            raise ValueError(f"solver options must map {', '.join(cls.SOLVER_OPTION_GROUPS)} to dicts of "
                             f"settings, got {options!r}")
        return {
            "command": "calibrate",
            "t1": t1Path,
            "tumor_labels": tumorLabelsPath,
            "tumor_label_values": {"necrotic": cls.BRATS_NECROTIC, "edema": cls.BRATS_EDEMA,
                                   "enhancing": cls.BRATS_ENHANCING},
            "tissue_labels": tissueLabelsPath,
            "tissue_label_values": dict(cls.TISSUE_LABELS),
            "atlas_set": atlasSet,
            "grid": int(grid),
            "device": device,
            "n_atlases": int(numberOfAtlases),
            "seed": int(seed),
            "out": os.path.join(folder, "out"),
            "options": json.loads(json.dumps(options)),  # a JSON copy: no caller objects in job.json
        }

    # -- process ---------------------------------------------------------------------
    def _interpreter(self):
        if self.pythonExecutable:
            return self.pythonExecutable
        return shutil.which("PythonSlicer") or sys.executable

    def _environment(self, device):
        env = dict(os.environ)
        folder = _libraryParentFolder()
        env["PYTHONPATH"] = os.pathsep.join([folder] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        return env

    def process(self, inputVolume, segmentationNode, coreSegmentId, edemaSegmentId="", enhancingSegmentId="",
                tissueSegmentation=None, atlasSet="bundled", numberOfAtlases=4, resolution=128, device="auto",
                seed=0, waitForCompletion=False, eventCallback=None, timeout=None, keepJobFolder=False,
                solverOptions=None):
        """Calibrate: write inputs and job.json, start ``-m GBMMassEffectLib calibrate --job DIR``.
        atlasSet: "bundled", a folder with atlases.json, or a label-map file. solverOptions:
        overrides of the paper's solver settings (see calibrationJobDict); None in the GUI."""
        if not inputVolume or not inputVolume.GetImageData():
            raise ValueError("the input T1 volume is missing or empty")
        if not segmentationNode:
            raise ValueError("the tumor segmentation is missing")
        folder = self.createJobFolder(self.JOB_CALIBRATE)
        try:
            inputs = os.path.join(folder, "input")
            t1Path = self.writeNode(inputVolume, os.path.join(inputs, "t1.nrrd"))
            tumorPath = self.writeTumorLabels(segmentationNode, inputVolume, coreSegmentId, edemaSegmentId,
                                              enhancingSegmentId, os.path.join(inputs, "tumor_labels.nrrd"))
            tissuePath = None
            if tissueSegmentation:
                tissuePath = self.writeTissueLabels(tissueSegmentation, inputVolume,
                                                    os.path.join(inputs, "tissue_labels.nrrd"))
            job = self.calibrationJobDict(folder, t1Path, tumorPath, tissuePath, str(atlasSet), resolution,
                                          device, numberOfAtlases, seed, solverOptions)
            with open(os.path.join(folder, "job.json"), "w") as f:
                json.dump(job, f, indent=2)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        args = pythonModuleCommand(self._interpreter(), ["calibrate", "--job", folder])
        return self._run(self.JOB_CALIBRATE, folder, args, device, inputVolume, eventCallback,
                         waitForCompletion, timeout, keepJobFolder)

    def processUsingParameterNode(self, p, **kwargs):
        atlasSet = "bundled" if p.useBundledAtlases else str(p.atlasFolder)
        return self.process(p.inputVolume, p.segmentation, p.coreSegmentId, p.edemaSegmentId,
                            p.enhancingSegmentId, p.tissueSegmentation, atlasSet, p.numberOfAtlases,
                            p.resolution, p.device.value, keepJobFolder=p.keepJobFolder, **kwargs)

    def simulate(self, labelsVolume, seedRAS=None, kappa=0.025, rho=12.0, gamma=0.4, resolution=64,
                 device="auto", preset=None, waitForCompletion=False, eventCallback=None, timeout=None,
                 keepJobFolder=False, extraArgs=()):
        """Forward run ``-m GBMMassEffectLib simulate`` from a tissue label volume (0 bg, 5 gm,
        6 wm, 7 vt, 8 csf) and a seed point (RAS mm); outputs load like a calibration's."""
        if not labelsVolume or not labelsVolume.GetImageData():
            raise ValueError("the tissue label volume is missing or empty")
        folder = self.createJobFolder(self.JOB_SIMULATE)
        labelsPath = self.writeNode(labelsVolume, os.path.join(folder, "input", "labels.nrrd"))
        args = ["simulate", "--labels", labelsPath, "--grid", int(resolution), "--device", device,
                "--out", os.path.join(folder, "out")]
        if preset:
            args += ["--preset", preset]
        else:
            args += ["--kappa", repr(float(kappa)), "--rho", repr(float(rho)), "--gamma", repr(float(gamma))]
        if seedRAS is not None:
            # one "--opt=value" token: a leading minus must not read as an option
            args += ["--seed-ras=" + ",".join(repr(float(v)) for v in seedRAS)]
        args += [str(a) for a in extraArgs]
        return self._run(self.JOB_SIMULATE, folder, pythonModuleCommand(self._interpreter(), args), device,
                         labelsVolume, eventCallback, waitForCompletion, timeout, keepJobFolder)

    def _run(self, kind, folder, args, device, referenceVolume, eventCallback, waitForCompletion, timeout,
             keepJobFolder):
        job = GBMMassEffectJob(kind, folder, args, self._environment(device), referenceVolume, eventCallback,
                               keepJobFolder)
        self.log(f"Starting {' '.join(args)}")
        job.runner = ProcessRunner(args, env=job.env, cwd=folder, graceSeconds=self.graceSeconds).start()
        if waitForCompletion:
            self.waitForJob(job, timeout)
        return job

    def pollJob(self, job) -> bool:
        """Handle the events that arrived; True once the job has finished (results loaded
        on success). Call it from a QTimer (GUI) or a wait loop (scripts)."""
        if not job.running:
            return True
        for event in job.runner.poll():
            kind = event.get("event")
            if kind == "progress":
                job.fraction = float(event.get("fraction", job.fraction) or 0.0)
                job.stage = str(event.get("stage", job.stage))
                job.message = str(event.get("message", ""))
            elif kind == "error":
                job.errorMessage = str(event.get("message", ""))
            elif kind == "log":
                logging.debug(event.get("message", ""))
            elif kind == "done":
                self._finish(job, event)
            if job.eventCallback:
                job.eventCallback(job, event)
        return not job.running

    def _finish(self, job, event):
        job.returncode = event["returncode"]
        job.elapsed = time.time() - job.startTime
        if event.get("cancelled") or job.cancelRequested:
            job.state = job.CANCELLED
            job.errorMessage = job.errorMessage or _("cancelled")
            self.log(f"{job.kind} cancelled after {job.elapsed:.1f} s")
        elif job.returncode != 0:
            job.state = job.FAILED
            tail = [line for line in job.runner.logTail if line.strip()]
            job.errorMessage = job.errorMessage or (tail[-1] if tail else f"solver exited with code {job.returncode}")
            self.log(f"{job.kind} failed (exit code {job.returncode}): {job.errorMessage}")
        else:
            try:
                job.nodes = self.loadResults(job.outputFolder, job.referenceVolume, job.kind)
                job.report = job.nodes.pop("report", None)
                job.state = job.COMPLETED
                self.log(f"{job.kind} finished in {job.elapsed:.1f} s")
                for note in job.notes():  # what to read the parameters with (bounds, inputs, registration)
                    self.log(f"note: {note}")
            except Exception as exc:  # a broken output is a failure, with nothing half-loaded
                job.state = job.FAILED
                job.errorMessage = f"could not load the results: {exc}"
                self.log(job.errorMessage)
        if not job.keepFolder:
            shutil.rmtree(job.folder, ignore_errors=True)
        else:
            self.log(f"job folder kept: {job.folder}")

    def waitForJob(self, job, timeout=None, interval=0.05):
        """Blocking mode for scripts and tests: poll until done; on timeout cancel, wait for
        the process to end and raise TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.pollJob(job):
            if deadline is not None and time.monotonic() > deadline:
                self.cancelJob(job)
                while not self.pollJob(job):
                    time.sleep(interval)
                raise TimeoutError(f"{job.kind} did not finish within {timeout:g} s")
            time.sleep(interval)
        return job

    def cancelJob(self, job):
        """Terminate the solver's process group (SIGTERM, then SIGKILL); nothing is loaded."""
        if job.running and not job.cancelRequested:
            job.cancelRequested = True
            job.runner.cancel()

    # -- outputs ---------------------------------------------------------------------
    @staticmethod
    def readVolume(path, name, nodeClass="vtkMRMLScalarVolumeNode"):
        node = slicer.mrmlScene.AddNewNodeByClass(nodeClass, slicer.mrmlScene.GenerateUniqueName(name))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(path)
        storage.SetSingleFile(True)
        if not storage.ReadData(node):
            slicer.mrmlScene.RemoveNode(node)
            raise RuntimeError(f"reading {os.path.basename(path)} failed")
        node.SetName(slicer.mrmlScene.GenerateUniqueName(name))
        return node

    @staticmethod
    def readDisplacementTransform(path, name, scale=1.0):
        """A displacement-field file (ITK vector image, LPS mm) as a grid transform.
        Slicer reads it as the resampling (FromParent) transform, RAS p -> p + R(field(p))
        with R = diag(-1, -1, 1); ``scale`` multiplies the field (-1 for the solver's u)."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", slicer.mrmlScene.GenerateUniqueName(name))
        storage = slicer.vtkMRMLTransformStorageNode()
        storage.SetFileName(path)
        if not storage.ReadData(node):
            slicer.mrmlScene.RemoveNode(node)
            raise RuntimeError(f"reading {os.path.basename(path)} as a displacement field failed")
        if scale != 1.0:
            field = slicer.util.arrayFromGridTransform(node)
            field *= scale
            slicer.util.arrayFromGridTransformModified(node)
        return node

    @staticmethod
    def _firstColorNodeID(candidates):
        for nodeID in candidates:
            if slicer.mrmlScene.GetNodeByID(nodeID):
                return nodeID
        return None

    @staticmethod
    def parameterRows(report) -> list:
        """(label, kappa, rho, gamma, max|u| mm) rows from report.json: per atlas, then mean
        and std for a calibration; one row for a simulation."""
        def values(d):
            d = d or {}
            p = d.get("parameters", d) if isinstance(d.get("parameters", d), dict) else d
            maxU = d.get("max_u_mm", p.get("max_u_mm"))
            return [p.get("kappa"), p.get("rho"), p.get("gamma"), maxU]

        rows = []
        atlases = report.get("atlases", report.get("per_atlas"))
        if isinstance(atlases, dict):
            atlases = [dict(v, name=k) for k, v in atlases.items()]
        for index, entry in enumerate(atlases or []):
            label = str(entry.get("name", entry.get("atlas", index + 1)))
            if entry.get("dropped"):
                label += " (dropped)"
            else:
                if entry.get("warnings"):  # e.g. a poor S.2 registration (report notes say which)
                    label += " (check registration)"
                onBound = [PARAMETER_SYMBOLS.get(k, k) for k in entry.get("at_bounds") or {}]
                if onBound:  # set by S.3's bound, not the data (report notes say which bound)
                    label += f" ({', '.join(onBound)} on bound)"
            rows.append([label] + values(entry))
        summary = report.get("summary", report)
        for key in ("mean", "std"):
            if isinstance(summary.get(key), dict):
                rows.append([key] + values(summary[key]))
        if not rows and isinstance(report.get("parameters"), dict):
            rows.append([report.get("command", "run")] + values(report))
        return rows

    def createParameterTable(self, report, name="GBM parameters"):
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(name))
        columns = [("Atlas", vtk.vtkStringArray)] + [(c, vtk.vtkDoubleArray) for c in
                                                     ("kappa", "rho", "gamma", "max |u| (mm)")]
        arrays = []
        for columnName, arrayClass in columns:
            array = arrayClass()
            array.SetName(columnName)
            arrays.append(array)
        for row in self.parameterRows(report):
            arrays[0].InsertNextValue(row[0])
            for array, value in zip(arrays[1:], row[1:]):
                array.InsertNextValue(float("nan") if value is None else float(value))
        for array in arrays:
            table.AddColumn(array)
        return table

    def loadResults(self, outputFolder, referenceVolume=None, kind=JOB_CALIBRATE, show=True) -> dict:
        """Load predicted tumor, |u| (mm), the displacement grid transform and the parameter
        table from a finished job's output folder. All or nothing."""
        reportPath = os.path.join(outputFolder, "report.json")
        if not os.path.isfile(reportPath):
            raise RuntimeError("the solver wrote no report.json")
        with open(reportPath) as f:
            report = json.load(f)
        prefix = "GBM " if kind == self.JOB_CALIBRATE else "GBM simulated "
        nodes = {}
        try:
            nodes["tumor"] = self.readVolume(os.path.join(outputFolder, "predicted_tumor.nrrd"), prefix + "predicted tumor")
            nodes["displacementNorm"] = self.readVolume(os.path.join(outputFolder, "displacement_norm.nrrd"),
                                                        prefix + "displacement (mm)")
            # displacement.nrrd holds u at the deformed position (tissue now at x came from
            # x - u(x)); the field -u is the transform that resamples the healthy brain
            # into the deformed one (deformed(x) = healthy(x - u(x)))
            nodes["displacement"] = self.readDisplacementTransform(os.path.join(outputFolder, "displacement.nrrd"),
                                                                   prefix + "displacement", scale=-1.0)
            initial = os.path.join(outputFolder, "initial_condition.nrrd")
            if os.path.isfile(initial):
                nodes["initialCondition"] = self.readVolume(initial, prefix + "initial condition")
            nodes["table"] = self.createParameterTable(report, prefix + "parameters")
        except Exception:
            for node in nodes.values():
                slicer.mrmlScene.RemoveNode(node)
            raise
        self._setupDisplay(nodes)
        if referenceVolume is not None:
            self._placeInStudy(nodes.values(), referenceVolume)
            if show:
                self.showResults(nodes, referenceVolume)
        nodes["report"] = report
        return nodes

    def _setupDisplay(self, nodes):
        import numpy as np
        tumor, norm = nodes["tumor"], nodes["displacementNorm"]
        for node, colors, lower, upper in (
                (tumor, self.TUMOR_COLOR_IDS, self.TUMOR_THRESHOLD, 1.0),
                (norm, self.DISPLACEMENT_COLOR_IDS, self.DISPLACEMENT_THRESHOLD_MM,
                 max(float(np.max(slicer.util.arrayFromVolume(norm))), 1.0))):
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            colorID = self._firstColorNodeID(colors)
            if colorID:
                display.SetAndObserveColorNodeID(colorID)
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, upper)
            display.SetThreshold(lower, 1e9)
            display.ApplyThresholdOn()
        legendAdder = getattr(slicer.vtkSlicerColorLogic, "AddDefaultColorLegendDisplayNode", None)
        if legendAdder is not None:
            legend = legendAdder(norm)
            if legend is not None:
                legend.SetTitleText("|u| (mm)")
                legend.SetVisibility(True)

    @staticmethod
    def _placeInStudy(nodes, referenceVolume):
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        if shNode is None:
            return
        item = shNode.GetItemByDataNode(referenceVolume)
        if not item:
            return
        parent = shNode.GetItemParent(item)
        if not parent:
            return
        for node in nodes:
            item = shNode.GetItemByDataNode(node)
            if item:
                shNode.SetItemParent(item, parent)

    def showResults(self, nodes, backgroundVolume):
        """T1 background, predicted tumor foreground; |u| as the next overlay layer where the
        slice views have one (Slicer >= 5.9), else as the foreground of the Yellow view."""
        slicer.util.setSliceViewerLayers(background=backgroundVolume, foreground=nodes["tumor"],
                                         foregroundOpacity=0.6, fit=False)
        norm = nodes["displacementNorm"]
        for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
            if hasattr(composite, "SetNthLayerVolumeID"):
                composite.SetNthLayerVolumeID(3, norm.GetID())
                composite.SetNthLayerOpacity(3, 0.4)
            elif composite.GetLayoutName() == "Yellow":
                composite.SetForegroundVolumeID(norm.GetID())

    # -- sample case -----------------------------------------------------------------
    @staticmethod
    def bundledAtlasLabelsPath():
        """The label map of the bundled atlas set's first atlas (atlases.json order: MNI152
        at 1.5 mm), else the first ``*_labels.*`` file (GBMMassEffectLib.resources:
        <package>/Resources/Atlases, else <repo>/Resources/Atlases)."""
        root = pathlib.Path(_libraryParentFolder())
        folders = [root / "GBMMassEffectLib" / "Resources" / "Atlases", root / "Resources" / "Atlases"]
        try:
            from GBMMassEffectLib import resources
            folders.insert(0, pathlib.Path(resources.default_atlas_dir()))
        except (ImportError, FileNotFoundError):
            pass
        for folder in folders:
            try:
                with open(folder / "atlases.json", encoding="utf-8") as f:
                    first = folder / json.load(f)["atlases"][0]["labels"]
                if first.is_file():
                    return str(first)
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                pass
            found = sorted(p for p in folder.glob("*_labels.*") if p.name.endswith((".nrrd", ".nii.gz", ".nii")))
            if found:
                return str(found[0])
        raise RuntimeError("the bundled atlas set was not found (searched: "
                           + ", ".join(str(f) for f in folders) + ")")

    def createSyntheticPatient(self, labelsVolume=None, preset="tc-b", resolution=64, device="auto", timeout=None):
        """Sample case: a forward run of a paper preset on an atlas gives a T1-like image and
        BraTS tumor segments (necrotic, edema, enhancing). Returns (T1 node, segmentation)."""
        import numpy as np
        ownLabels = labelsVolume is None
        if ownLabels:
            labelsVolume = self.readVolume(self.bundledAtlasLabelsPath(), "GBM atlas labels", "vtkMRMLLabelMapVolumeNode")
        folder = self.createJobFolder("sample")
        try:
            labelsPath = self.writeNode(labelsVolume, os.path.join(folder, "input", "labels.nrrd"))
            out = os.path.join(folder, "out")
            args = pythonModuleCommand(self._interpreter(), [
                "simulate", "--labels", labelsPath, "--preset", preset, "--grid", int(resolution),
                "--device", device, "--out", out])
            runner = ProcessRunner(args, env=self._environment(device), cwd=folder).start()
            if runner.waitForCompletion(timeout=timeout) != 0:
                raise RuntimeError(runner.lastError or f"the synthetic patient run failed (exit code {runner.returncode})")
            t1 = self.readVolume(os.path.join(out, "t1.nrrd"), "GBMSyntheticPatient_T1")
            patient = self.readVolume(os.path.join(out, "patient_labels.nrrd"), "__gbm_patient__",
                                      "vtkMRMLLabelMapVolumeNode")
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "GBMSyntheticPatient_tumor")
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(t1)
            labels = slicer.util.arrayFromVolume(patient)
            colors = {"necrotic": (0.35, 0.2, 0.1), "edema": (0.2, 0.6, 1.0), "enhancing": (1.0, 0.9, 0.2)}
            for name, value in (("necrotic", 1), ("edema", 2), ("enhancing", 4)):
                single = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gbm_single__")
                slicer.util.updateVolumeFromArray(single, (labels == value).astype(np.uint8))
                single.CopyOrientation(patient)
                before = segmentation.GetSegmentation().GetNumberOfSegments()
                slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(single, segmentation)
                if segmentation.GetSegmentation().GetNumberOfSegments() > before:
                    segment = segmentation.GetSegmentation().GetNthSegment(before)
                    segment.SetName(name)
                    segment.SetColor(*colors[name])
                slicer.mrmlScene.RemoveNode(single)
            slicer.mrmlScene.RemoveNode(patient)
            return t1, segmentation
        finally:
            if ownLabels:
                slicer.mrmlScene.RemoveNode(labelsVolume)
            shutil.rmtree(folder, ignore_errors=True)


#
# Test
#

class GBMMassEffectTest(ScriptedLoadableModuleTest):
    """Runs the Logic end to end with the real solver process on a 32³ synthetic case.
    The same class runs inside Slicer (ctest py_GBMMassEffect) and under pytest with the
    slicer-core stand-in (Testing/test_module.py)."""

    GRID = 32
    SPACING = 4.0
    ORIGIN = (61.5, -70.25, 40.0)
    TIMEOUT = 240.0
    # cut-down solver settings for the calibration test (plumbing, geometry and the process
    # contract; the recovery is tested in the solver's own tests). The GUI sends none: the
    # paper's settings.
    CHEAP_OPTIONS = {
        "s1": {"cosamp_iterations": 1, "subspace_maxiter": 3, "final_maxiter": 3, "nt": 10},
        "s3": {"maxiter": 2, "hessian": False, "nt": 9, "dt": 0.1, "workers": 2, "c0_pullback": 1},
        "registration": {"iterations": 6, "affine_iterations": 15, "spacing_mm": 8.0},
    }
    # T1-like intensities of the test atlas (GBMMassEffectLib.presets.T1_INTENSITY)
    ATLAS_T1 = {"gm": 650.0, "wm": 900.0, "vt": 350.0, "csf": 350.0}

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CalibrateEndToEnd()
        self.setUp()
        self.test_SimulateEndToEnd()
        self.setUp()
        self.test_Cancel()
        self.setUp()
        self.test_Failure()
        self.setUp()
        self.test_ParameterRows()
        self.setUp()
        self.test_SampleCase()

    # -- synthetic case --------------------------------------------------------------
    @staticmethod
    def direction():
        """A rotation (20° about S) with flipped L/P axes: not axis aligned, det +1."""
        import numpy as np
        a = np.deg2rad(20.0)
        rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        return rot @ np.diag([-1.0, -1.0, 1.0])

    @classmethod
    def atlasLabels32(cls):
        """32³ tissue labels (0/5/6/7/8): the reference atlas subsampled by 2 when its file
        is next to the source tree, else an ellipsoidal phantom."""
        import numpy as np
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(os.path.dirname(here), "Testing", "Data", "glia-testdata", "atlas.nc")
        if os.path.isfile(path):
            import scipy.io
            with scipy.io.netcdf_file(path, "r", mmap=False) as f:
                atlas = f.variables["data"].data.astype(np.float32)
            return np.rint(atlas[::2, ::2, ::2]).astype(np.uint8)
        n = cls.GRID
        z, y, x = np.mgrid[0:n, 0:n, 0:n] - (n - 1) / 2.0
        r = np.sqrt((x / 13.0) ** 2 + (y / 14.0) ** 2 + (z / 12.0) ** 2)
        labels = np.zeros((n, n, n), np.uint8)
        labels[r < 1.0] = 8
        labels[r < 0.9] = 5
        labels[r < 0.7] = 6
        labels[(np.sqrt(((np.abs(x) - 3) / 2.0) ** 2 + (y / 5.0) ** 2 + (z / 3.0) ** 2)) < 1.0] = 7
        return labels

    def makeLabelVolume(self, labels=None, name="GBM test labels"):
        labels = self.atlasLabels32() if labels is None else labels
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, labels)
        node.SetSpacing(self.SPACING, self.SPACING, self.SPACING)
        node.SetOrigin(*self.ORIGIN)
        m = vtk.vtkMatrix4x4()
        d = self.direction()
        for i in range(3):
            for j in range(3):
                m.SetElement(i, j, float(d[i, j]))
        node.SetIJKToRASDirectionMatrix(m)
        return node

    @staticmethod
    def deepWhiteMatterRAS(labelNode):
        """RAS of the white-matter voxel farthest from other tissue (a seed for growth)."""
        import numpy as np
        import scipy.ndimage
        labels = slicer.util.arrayFromVolume(labelNode)
        depth = scipy.ndimage.distance_transform_edt(labels == 6)
        k, j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)
        m = vtk.vtkMatrix4x4()
        labelNode.GetIJKToRASMatrix(m)
        return list(m.MultiplyPoint([float(i), float(j), float(k), 1.0])[:3])

    def assertSameGeometry(self, node, reference):
        import numpy as np
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(a)
        reference.GetIJKToRASMatrix(b)
        ma = np.array([[a.GetElement(i, j) for j in range(4)] for i in range(4)])
        mb = np.array([[b.GetElement(i, j) for j in range(4)] for i in range(4)])
        np.testing.assert_allclose(ma, mb, atol=1e-4, err_msg=f"{node.GetName()} lost the input geometry")
        self.assertEqual(node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())

    def writeAtlasFolder(self, labelNode, folder, name="test32"):
        """A one-atlas set in folder: the label map, a T1-like image of it, atlases.json."""
        import numpy as np
        labels = slicer.util.arrayFromVolume(labelNode)
        t1 = np.zeros(labels.shape, np.float32)
        for tissue, value in GBMMassEffectLogic.TISSUE_LABELS.items():
            t1[labels == value] = self.ATLAS_T1[tissue]
        t1Node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "__gbm_atlas_t1__")
        try:
            slicer.util.updateVolumeFromArray(t1Node, t1)
            t1Node.CopyOrientation(labelNode)
            os.makedirs(folder, exist_ok=True)
            GBMMassEffectLogic.writeNode(labelNode, os.path.join(folder, f"{name}_labels.nrrd"))
            GBMMassEffectLogic.writeNode(t1Node, os.path.join(folder, f"{name}_t1.nrrd"))
        finally:
            slicer.mrmlScene.RemoveNode(t1Node)
        with open(os.path.join(folder, "atlases.json"), "w") as f:
            json.dump({"description": "GBMMassEffect self-test atlas",
                       "atlases": [{"name": name, "labels": f"{name}_labels.nrrd", "t1": f"{name}_t1.nrrd",
                                    "source": "test", "synthetic": True}]}, f)
        return folder

    # -- tests -----------------------------------------------------------------------
    def test_CalibrateEndToEnd(self):
        """The main path: a T1 and BraTS tumor segments in, `calibrate` run as a process,
        predicted tumor, |u| and the parameter table loaded on the T1's geometry."""
        import numpy as np
        self.delayDisplay("GBMMassEffect: calibration through the Logic on a 32³ synthetic case")
        labels = self.makeLabelVolume()
        logic = GBMMassEffectLogic()
        t1, segmentation = logic.createSyntheticPatient(labels, preset="tc-b", resolution=self.GRID, device="cpu",
                                                        timeout=self.TIMEOUT)
        seg = segmentation.GetSegmentation()
        necrotic, edema, enhancing = (seg.GetSegmentIdBySegmentName(n) for n in ("necrotic", "edema", "enhancing"))
        self.assertTrue(necrotic)
        atlasFolder = self.writeAtlasFolder(labels, os.path.join(logic.createJobFolder("atlases"), "atlases"))
        events, logs = [], []
        logic.logCallback = logs.append
        try:
            job = logic.process(t1, segmentation, necrotic, edema, enhancing, atlasSet=atlasFolder,
                                numberOfAtlases=1, resolution=self.GRID, device="cpu", waitForCompletion=True,
                                timeout=self.TIMEOUT, eventCallback=lambda j, e: events.append(e),
                                solverOptions=self.CHEAP_OPTIONS)
        finally:
            shutil.rmtree(os.path.dirname(atlasFolder), ignore_errors=True)
        self.assertEqual(job.state, job.COMPLETED, job.errorMessage)
        self.assertEqual(job.returncode, 0)
        self.assertFalse(os.path.exists(job.folder))
        stages = {e.get("stage") for e in events if e["event"] == "progress"}
        self.assertTrue({"S.1", "S.2", "S.3"} <= stages, stages)
        fractions = [e["fraction"] for e in events if e["event"] == "progress"]
        self.assertEqual(fractions, sorted(fractions))
        self.assertAlmostEqual(job.fraction, 1.0)

        tumor, norm = job.nodes["tumor"], job.nodes["displacementNorm"]
        for node in (tumor, norm, job.nodes["initialCondition"]):
            self.assertSameGeometry(node, t1)
        self.assertIsNotNone(job.nodes["displacement"].GetTransformFromParent())
        c = slicer.util.arrayFromVolume(tumor)
        self.assertTrue(np.isfinite(c).all())
        self.assertGreaterEqual(float(c.min()), 0.0)
        self.assertLessEqual(float(c.max()), 1.0 + 1e-6)
        self.assertGreater(float(c.max()), 0.1)  # a tumor was predicted
        # the predicted tumor lies on the segmented one: its peak is inside the tumor's labels
        tumorMask = logic._segmentMask(segmentation, necrotic, t1)
        if edema:
            tumorMask |= logic._segmentMask(segmentation, edema, t1)
        self.assertTrue(tumorMask[np.unravel_index(int(np.argmax(c)), c.shape)])
        u = slicer.util.arrayFromVolume(norm)
        self.assertTrue(np.isfinite(u).all())
        self.assertGreaterEqual(float(u.min()), 0.0)
        self.assertLess(float(u.max()), 60.0)  # mm
        # report and table: one row per atlas, then mean and std
        report = job.report
        self.assertEqual([a["name"] for a in report["atlases"]], ["test32"])
        self.assertIn("displacement_norm_std.nrrd", report["outputs"])
        table = job.nodes["table"]
        self.assertEqual(table.GetNumberOfRows(), 3)
        entry = report["atlases"][0]
        # the atlas's row is marked when S.3 left a parameter on its bound (report at_bounds)
        symbols = [PARAMETER_SYMBOLS[k] for k in entry["at_bounds"]]
        label = "test32" + (f" ({', '.join(symbols)} on bound)" if symbols else "")
        self.assertEqual([table.GetCellText(r, 0) for r in range(3)], [label, "mean", "std"])
        for column, key in ((1, "kappa"), (2, "rho"), (3, "gamma")):
            value = float(table.GetCellText(0, column))  # the table's text has ~6 digits
            self.assertAlmostEqual(value, entry[key], delta=1e-4 * max(1e-3, abs(entry[key])))
            self.assertAlmostEqual(float(table.GetCellText(1, column)), value, delta=1e-4 * max(1e-3, abs(value)))
            self.assertAlmostEqual(float(table.GetCellText(2, column)), 0.0)  # one atlas: std 0
        self.assertGreater(entry["kappa"], 0.0)
        self.assertGreater(entry["rho"], 0.0)
        self.assertGreaterEqual(entry["gamma"], 0.0)
        self.assertGreaterEqual(float(table.GetCellText(0, 4)), 0.0)
        self.assertIn("max displacement", job.summary())
        # report notes (here at least the tissue taken from the atlas: no tissue segmentation
        # was given) reach the module's log, and the status line says how many there are
        self.assertIsInstance(report["notes"], list)
        self.assertTrue(report["notes"])
        for note in report["notes"]:
            self.assertIn(f"note: {note}", logs)
        self.assertIn(f"{len(report['notes'])} note(s) in the log", job.summary())
        self.delayDisplay("Calibration loaded with the input geometry")

    def test_SimulateEndToEnd(self):
        import numpy as np
        self.delayDisplay("GBMMassEffect: forward run through the Logic on a 32³ synthetic case")
        labels = self.makeLabelVolume()
        seed = self.deepWhiteMatterRAS(labels)
        logic = GBMMassEffectLogic()
        events = []
        job = logic.simulate(labels, seedRAS=seed, kappa=0.025, rho=12.0, gamma=0.8, resolution=self.GRID,
                             device="cpu", waitForCompletion=True, timeout=self.TIMEOUT,
                             eventCallback=lambda j, e: events.append(e))
        self.assertEqual(job.state, job.COMPLETED, job.errorMessage)
        self.assertEqual(job.returncode, 0)
        self.assertFalse(os.path.exists(job.folder))  # temporary job folder removed
        kinds = [e["event"] for e in events]
        self.assertEqual(kinds.count("done"), 1)
        fractions = [e["fraction"] for e in events if e["event"] == "progress"]
        self.assertGreater(len(fractions), 3)
        self.assertEqual(fractions, sorted(fractions))
        self.assertAlmostEqual(job.fraction, 1.0)

        tumor, norm, transform = job.nodes["tumor"], job.nodes["displacementNorm"], job.nodes["displacement"]
        for node in (tumor, norm, job.nodes["initialCondition"]):
            self.assertSameGeometry(node, labels)
        c = slicer.util.arrayFromVolume(tumor)
        self.assertGreaterEqual(float(c.min()), 0.0)
        self.assertLessEqual(float(c.max()), 1.0 + 1e-6)
        self.assertGreater(float(c.max()), 0.3)
        # the tumor grows around the seed: the brightest voxel is within two voxels of it
        ras2ijk = vtk.vtkMatrix4x4()
        tumor.GetRASToIJKMatrix(ras2ijk)
        seedIJK = np.array(ras2ijk.MultiplyPoint(seed + [1.0])[:3])
        k, j, i = np.unravel_index(int(np.argmax(c)), c.shape)
        self.assertLess(float(np.linalg.norm(np.array([i, j, k]) - seedIJK)), 2.5)
        u = slicer.util.arrayFromVolume(norm)
        self.assertGreater(float(u.max()), 0.1)  # gamma > 0 pushes tissue (mm)
        self.assertLess(float(u.max()), 40.0)
        self.assertAlmostEqual(float(u.max()), job.report["max_u_mm_on_input_grid"], places=3)
        # the grid transform carries -u: |FromParent(p) - p| = |u|(p) at the max, and the
        # resampling transform points back towards the seed (tissue was pushed away from it)
        k, j, i = np.unravel_index(int(np.argmax(u)), u.shape)
        ijk2ras = vtk.vtkMatrix4x4()
        norm.GetIJKToRASMatrix(ijk2ras)
        p = ijk2ras.MultiplyPoint([float(i), float(j), float(k), 1.0])[:3]
        q = transform.GetTransformFromParent().TransformPoint(p)
        self.assertAlmostEqual(float(np.linalg.norm(np.subtract(q, p))), float(u[k, j, i]), delta=1e-3 * max(1.0, float(u[k, j, i])))
        self.assertLess(float(np.linalg.norm(np.subtract(q, seed))), float(np.linalg.norm(np.subtract(p, seed))))
        # display: tumor thresholded with a colour map, |u| with a colour map and a legend
        display = tumor.GetDisplayNode()
        self.assertTrue(display.GetApplyThreshold())
        self.assertAlmostEqual(display.GetLowerThreshold(), GBMMassEffectLogic.TUMOR_THRESHOLD)
        self.assertNotEqual(display.GetColorNodeID(), "vtkMRMLColorTableNodeGrey")
        self.assertIsNotNone(norm.GetDisplayNode().GetColorNodeID())
        # parameter table: one row with the parameters that were run
        table = job.nodes["table"]
        self.assertEqual(table.GetNumberOfRows(), 1)
        self.assertAlmostEqual(float(table.GetCellText(0, 3)), 0.8)
        self.assertAlmostEqual(float(table.GetCellText(0, 2)), 12.0)
        self.delayDisplay("Forward run loaded with the input geometry")

    def test_Cancel(self):
        self.delayDisplay("GBMMassEffect: cancel a running job")
        labels = self.makeLabelVolume()
        seed = self.deepWhiteMatterRAS(labels)
        logic = GBMMassEffectLogic()
        volumesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        job = logic.simulate(labels, seedRAS=seed, gamma=0.8, resolution=64, device="cpu")
        t0 = time.monotonic()
        while not logic.pollJob(job) and job.fraction <= 0.05:
            self.assertLess(time.monotonic() - t0, self.TIMEOUT)
            time.sleep(0.02)
        self.assertTrue(job.running, "the 64³ run ended before it could be cancelled")
        logic.cancelJob(job)
        t1 = time.monotonic()
        logic.waitForJob(job, timeout=60)
        self.assertLess(time.monotonic() - t1, 15.0)
        self.assertEqual(job.state, job.CANCELLED)
        self.assertNotEqual(job.returncode, 0)
        self.assertEqual(job.nodes, {})
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumesBefore)
        self.assertFalse(os.path.exists(job.folder))

    def test_Failure(self):
        self.delayDisplay("GBMMassEffect: a solver error is reported and nothing is loaded")
        labels = self.makeLabelVolume()
        logic = GBMMassEffectLogic()
        volumesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        # a seed far outside the head: the solver must refuse it with a one-line error
        job = logic.simulate(labels, seedRAS=[900.0, 900.0, 900.0], resolution=self.GRID, device="cpu",
                             waitForCompletion=True, timeout=self.TIMEOUT)
        self.assertEqual(job.state, job.FAILED)
        self.assertNotEqual(job.returncode, 0)
        self.assertTrue(job.errorMessage)
        self.assertNotIn("\n", job.errorMessage)
        self.assertNotIn("Traceback", job.errorMessage)
        self.assertEqual(job.nodes, {})
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumesBefore)
        with self.assertRaises(ValueError):
            logic.simulate(None)

    def test_ParameterRows(self):
        report = {"atlases": [{"name": "a1", "parameters": {"kappa": 0.02, "rho": 10.0, "gamma": 0.5}, "max_u_mm": 4.0},
                              {"name": "a2", "kappa": 0.03, "rho": 12.0, "gamma": 0.7, "max_u_mm": 6.0,
                               "dropped": "registration failed"},
                              {"name": "a3", "kappa": 0.02, "rho": 9.0, "gamma": 0.4, "max_u_mm": 3.0,
                               "dropped": None, "warnings": ["the S.2 registration looks poor"]},
                              {"name": "a4", "kappa": 0.05, "rho": 8.0, "gamma": 0.6, "max_u_mm": 5.0,
                               "dropped": None, "at_bounds": {"kappa": "upper"}}],
                  "mean": {"kappa": 0.025, "rho": 11.0, "gamma": 0.6, "max_u_mm": 5.0},
                  "std": {"kappa": 0.005, "rho": 1.0, "gamma": 0.1, "max_u_mm": 1.0}}
        rows = GBMMassEffectLogic.parameterRows(report)
        self.assertEqual([r[0] for r in rows],
                         ["a1", "a2 (dropped)", "a3 (check registration)", "a4 (κ on bound)", "mean", "std"])
        self.assertEqual(rows[0][1:], [0.02, 10.0, 0.5, 4.0])
        self.assertEqual(rows[4][1:], [0.025, 11.0, 0.6, 5.0])
        table = GBMMassEffectLogic().createParameterTable(report)
        self.assertEqual(table.GetNumberOfRows(), 6)
        self.assertEqual(table.GetNumberOfColumns(), 5)
        self.assertAlmostEqual(float(table.GetCellText(5, 3)), 0.1)  # the std row's γ

    def test_SampleCase(self):
        """The sample case: T1 and BraTS tumor segments from a preset forward run, on the
        atlas geometry (here the 32³ test labels instead of the bundled atlas)."""
        import numpy as np
        self.delayDisplay("GBMMassEffect: synthetic sample patient")
        labels = self.makeLabelVolume()
        t1, segmentation = GBMMassEffectLogic().createSyntheticPatient(labels, preset="tc-b", resolution=self.GRID,
                                                                       device="cpu", timeout=self.TIMEOUT)
        self.assertSameGeometry(t1, labels)
        t1Array = slicer.util.arrayFromVolume(t1)
        tissue = slicer.util.arrayFromVolume(labels)
        wm, fluid, background = (np.median(t1Array[mask]) for mask in (tissue == 6, tissue >= 7, tissue == 0))
        self.assertGreater(float(wm), float(fluid) + 100.0)  # T1 contrast: white matter bright, CSF dark
        self.assertLess(float(background), float(fluid))
        names = {segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())}
        self.assertIn("necrotic", names)
        self.assertTrue(names <= {"necrotic", "edema", "enhancing"})
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByName("__gbm_patient__"))
