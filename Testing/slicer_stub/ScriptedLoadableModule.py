"""Stand-in for ``slicer.ScriptedLoadableModule`` (slicer-core lacks it; Slicer's imports qt/ctk).

Same class names and the behaviour tests rely on: the Module's ``parent`` fields and
``resourcePath``/``runTest``, the Logic's singleton parameter node (a
``vtkMRMLScriptedModuleNode`` tagged with the ``ModuleName`` attribute), and the Test as a
``unittest.TestCase`` whose ``delayDisplay`` only logs. The Widget exists so a module file
imports; it cannot be set up without Qt.
"""
from __future__ import annotations

import importlib
import logging
import os
import types
import unittest

import slicer

__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
           "ScriptedLoadableModuleTest"]


def makeParent(path: str) -> types.SimpleNamespace:
    """What Slicer's module factory passes as ``parent`` (a qSlicerScriptedLoadableModule)."""
    return types.SimpleNamespace(path=path, title="", categories=[], dependencies=[], contributors=[],
                                 helpText="", acknowledgementText="", icon=None, hidden=False)


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ""

    def runTest(self, msec=100, **kwargs):
        module = importlib.import_module(self.__module__)
        testCase = getattr(module, self.moduleName + "Test")()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__[:-len("Widget")]
        self.parent = parent
        self.developerMode = False

    def resourcePath(self, filename):
        module = importlib.import_module(self.__module__)
        return os.path.join(os.path.dirname(module.__file__), "Resources", filename)

    def setup(self):
        raise RuntimeError("Widgets need Qt: the slicer-core stand-in cannot set up a module GUI")

    def cleanup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.enableScreenshots = False
        self.screenshotScaleFactor = 1.0

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logging.info(message)

    def takeScreenshot(self, name, description, type=-1):
        logging.info(description)

    def runTest(self):
        logging.warning("No test is defined in " + self.__class__.__name__)
