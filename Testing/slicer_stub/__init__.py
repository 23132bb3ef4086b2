"""Project-owned stand-in for what the PyPI package slicer-core lacks (EXAMPLES.md §0, §7).

slicer-core brings the real MRML/Logic classes and ``slicer.util``; ``install()`` adds, on top
of it and only where missing: ``slicer.app`` (``testingEnabled``, ``temporaryPath``,
``processEvents`` that runs the stand-in qt timers), ``slicer.mrmlScene`` (a real
``vtkMRMLScene`` with application logic, colour logic, the segmentation conversion rules and
Red/Yellow/Green slice views), ``slicer.modules``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n``, and the modules ``qt`` and ``ctk``.
Inside real Slicer nothing here is used.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types

__all__ = ["install", "loadModuleFile", "processEvents"]

_HERE = os.path.dirname(os.path.abspath(__file__))


class _App:
    """The parts of ``slicer.app`` (qSlicerApplication) a scripted module's Logic/Test uses."""

    def __init__(self, scene, applicationLogic):
        self.temporaryPath = tempfile.mkdtemp(prefix="slicer-stub-")
        self.mrmlScene = scene
        self._applicationLogic = applicationLogic
        self.commandOptions = lambda: types.SimpleNamespace(noMainWindow=True)

    def testingEnabled(self):
        return True

    def processEvents(self, *args):
        from . import qt
        qt.processPendingTimers()

    def connect(self, signal, slot):
        return True

    def layoutManager(self):
        return None

    def mainWindow(self):
        return None

    def applicationLogic(self):
        return self._applicationLogic


def _subModule(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _registerConversionRules(slicer):
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for ruleName in ("vtkBinaryLabelmapToClosedSurfaceConversionRule",
                     "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                     "vtkFractionalLabelmapToClosedSurfaceConversionRule",
                     "vtkClosedSurfaceToFractionalLabelmapConversionRule"):
        rule = getattr(slicer, ruleName, None)
        if rule is not None and ruleName not in registered:
            factory.RegisterConverterRule(rule())


def _newScene(slicer):
    scene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkMRMLApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkSlicerColorLogic()
    colorLogic.SetMRMLApplicationLogic(applicationLogic)
    colorLogic.SetMRMLScene(scene)
    sliceLogics = []
    for name in ("Red", "Yellow", "Green"):
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLApplicationLogic(applicationLogic)
        sliceLogic.SetMRMLScene(scene)
        sliceLogic.AddSliceNode(name)
        sliceLogics.append(sliceLogic)
    # keep the logics alive as long as the scene
    scene._stubLogics = (applicationLogic, colorLogic, sliceLogics)
    return scene, applicationLogic


def install():
    """Make ``import slicer, qt, ctk`` and the scripted-module imports work under pytest.
    Idempotent; returns the ``slicer`` package."""
    import slicer
    import slicer.util  # noqa: F401

    if getattr(slicer, "_gbmStubInstalled", False):
        return slicer
    if "qt" not in sys.modules:
        sys.modules["qt"] = _subModule("qt", os.path.join(_HERE, "qt.py"))
    if "ctk" not in sys.modules:
        sys.modules["ctk"] = types.ModuleType("ctk")
    for name in ("i18n", "ScriptedLoadableModule", "parameterNodeWrapper"):
        if not hasattr(slicer, name):
            module = _subModule(f"slicer.{name}", os.path.join(_HERE, f"{name}.py"))
            setattr(slicer, name, module)
    _registerConversionRules(slicer)
    if getattr(slicer, "mrmlScene", None) is None:
        scene, applicationLogic = _newScene(slicer)
        slicer.mrmlScene = scene
        slicer.app = _App(scene, applicationLogic)
    if not hasattr(slicer, "modules"):
        slicer.modules = types.SimpleNamespace()
    if not hasattr(slicer, "selfTests"):
        slicer.selfTests = {}
    slicer._gbmStubInstalled = True
    return slicer


def processEvents():
    """Run due stand-in timers (what the Qt event loop does in Slicer)."""
    import slicer
    slicer.app.processEvents()


def loadModuleFile(path, name=None):
    """Import a scripted module file the way Slicer does (its folder on sys.path) and create
    its Module object with a stand-in ``parent``; returns (python module, Module instance)."""
    slicer = install()
    path = os.path.abspath(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = sys.modules.get(name)
    if module is None or os.path.abspath(getattr(module, "__file__", "")) != path:
        module = _subModule(name, path)
    parent = slicer.ScriptedLoadableModule.makeParent(path)
    instance = getattr(module, name)(parent)
    return module, instance
