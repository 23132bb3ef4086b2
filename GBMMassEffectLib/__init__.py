"""GBMMassEffectLib: calibration of a glioblastoma growth model with mass effect.

Solver package of the GBMMassEffect 3D Slicer extension. It imports numpy, scipy and
SimpleITK (CuPy optional) and never slicer, qt or vtk.
"""
__version__ = "0.1.0"
