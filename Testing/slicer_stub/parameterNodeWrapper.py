"""Stand-in for ``slicer.parameterNodeWrapper`` (Slicer's imports qt/ctk at the top).

Enough of the API for a module's parameter node class: ``@parameterNodeWrapper`` turns
annotated class attributes into properties stored in a ``vtkMRMLScriptedModuleNode``
(plain values as parameters, MRML nodes as node references), with ``Annotated`` validators
``WithinRange``, ``Minimum``, ``Maximum``, ``Choice`` and ``Default``; the wrapper forwards
``AddObserver``/``RemoveObserver``/``StartModify``/``EndModify``/``Modified``, and
``connectGui``/``disconnectGui`` accept a GUI and bind nothing (there are no widgets here).
"""
from __future__ import annotations

import enum
import pathlib
import typing

import slicer

__all__ = ["parameterNodeWrapper", "WithinRange", "Minimum", "Maximum", "Choice", "Default",
           "isParameterNodeWrapper"]


class _Validator:
    def validate(self, value):
        pass


class WithinRange(_Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"value {value} is not within [{self.minimum}, {self.maximum}]")


class Minimum(_Validator):
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"value {value} is below the minimum {self.minimum}")


class Maximum(_Validator):
    def __init__(self, maximum):
        self.maximum = maximum

    def validate(self, value):
        if value > self.maximum:
            raise ValueError(f"value {value} is above the maximum {self.maximum}")


class Choice(_Validator):
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"value {value!r} is not one of {self.choices}")


class Default:
    def __init__(self, value):
        self.value = value


def _isNodeType(t) -> bool:
    return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)


def _split(annotation):
    base, extras = annotation, []
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
    if typing.get_origin(base) is typing.Union:  # Optional[Node]
        args = [a for a in typing.get_args(base) if a is not type(None)]
        base = args[0] if len(args) == 1 else base
    return base, extras


def _zero(base):
    if _isNodeType(base):
        return None
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return next(iter(base))
    return {bool: False, int: 0, float: 0.0, str: "", pathlib.Path: pathlib.Path()}.get(base)


class _Param:
    def __init__(self, name, base, validators, default):
        self.name, self.base, self.validators, self.default = name, base, validators, default

    def read(self, node):
        if _isNodeType(self.base):
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if text == "" and self.base is not str:
            return self.default
        if self.base is bool:
            return text == "True"
        if isinstance(self.base, type) and issubclass(self.base, enum.Enum):
            return self.base[text]
        return self.base(text)

    def write(self, node, value):
        if _isNodeType(self.base):
            if value is not None and not isinstance(value, self.base):
                raise TypeError(f"{self.name}: expected {self.base.__name__}, got {type(value).__name__}")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
            return
        if isinstance(self.base, type) and issubclass(self.base, enum.Enum):
            value = self.base(value) if not isinstance(value, self.base) else value
            for v in self.validators:
                v.validate(value)
            node.SetParameter(self.name, value.name)
            return
        value = self.base(value)
        for v in self.validators:
            v.validate(value)
        node.SetParameter(self.name, str(value))


def _makeProperty(param):
    return property(lambda self: param.read(self.parameterNode),
                    lambda self, value: param.write(self.parameterNode, value))


def parameterNodeWrapper(classtype=None):
    def wrap(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        params = {}
        for name, annotation in hints.items():
            base, extras = _split(annotation)
            validators = [e for e in extras if isinstance(e, _Validator)]
            defaults = [e.value for e in extras if isinstance(e, Default)]
            default = getattr(cls, name) if hasattr(cls, name) else (defaults[0] if defaults else _zero(base))
            params[name] = _Param(name, base, validators, default)
        for name, param in params.items():
            setattr(cls, name, _makeProperty(param))

        def __init__(self, parameterNode):
            self.parameterNode = parameterNode
            with slicer.util.NodeModify(parameterNode):
                for p in params.values():
                    if _isNodeType(p.base):
                        continue
                    if p.name not in parameterNode.GetParameterNames():
                        p.write(parameterNode, p.default)

        cls.__init__ = __init__
        cls.allParameters = params
        cls._is_parameter_node_wrapper = True
        cls.getValue = lambda self, name: getattr(self, name)
        cls.setValue = lambda self, name, value: setattr(self, name, value)
        cls.connectGui = lambda self, gui: 0
        cls.disconnectGui = lambda self, tag: None
        cls.StartModify = lambda self: self.parameterNode.StartModify()
        cls.EndModify = lambda self, wasModified: self.parameterNode.EndModify(wasModified)
        cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority)
        cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
        cls.Modified = lambda self: self.parameterNode.Modified()
        return cls

    return wrap if classtype is None else wrap(classtype)


def isParameterNodeWrapper(classOrObj):
    return getattr(classOrObj, "_is_parameter_node_wrapper", False)
