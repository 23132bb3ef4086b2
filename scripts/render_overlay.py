"""Render the README picture headlessly: a synthetic patient, the module's overlays.

Runs the GBMMassEffect Logic (slicer-core + the project's stand-in, Testing/slicer_stub)
outside Slicer: a synthetic patient from the bundled MNI152 atlas (1.5 mm) by a forward run
of a paper preset (TC(c) by default) at 128³, then the module's result loading
(predicted tumor as foreground with its colour map and threshold, |u| in mm as the next
overlay layer with its colour map), rendered by vtkMRMLSliceLogic (the same slice pipeline
Slicer's views use, offscreen: no render window) and written with a colour legend for |u|.

    python scripts/render_overlay.py [--out Resources/Screenshots/overlays.png] [--grid 128] [--labels FILE] [--preset tc-c]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))


def slice_rgba(sliceLogic):
    """The blended RGBA slice image of a vtkMRMLSliceLogic as a (rows, cols, 4) array, top row first."""
    from vtk.util import numpy_support
    sliceLogic.UpdateImageData()
    producer = sliceLogic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    nx, ny, _ = image.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)
    return rgba[::-1].copy()


def lookup_rgb(colorNode, values, vmin, vmax):
    lut = colorNode.GetLookupTable() if hasattr(colorNode, "GetLookupTable") and colorNode.GetLookupTable() else colorNode.GetScalarsToColors()
    out = []
    for v in values:
        if hasattr(lut, "GetTableValue") and lut.GetNumberOfTableValues():
            n = lut.GetNumberOfTableValues()
            idx = int(np.clip((v - vmin) / (vmax - vmin) * (n - 1), 0, n - 1))
            out.append(lut.GetTableValue(idx)[:3])
        else:
            r = lut.GetRange()
            out.append(lut.GetColor(r[0] + (v - vmin) / (vmax - vmin) * (r[1] - r[0])))
    return np.array(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "Resources" / "Screenshots" / "overlays.png"))
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--labels", default=str(REPO / "Resources" / "Atlases" / "mni152_labels.nrrd"),
                    help="tissue label map (5 gm, 6 wm, 7 vt, 8 csf); default the bundled MNI152 "
                         "atlas; 'glia' uses the 64³ reference test atlas at 4 mm")
    ap.add_argument("--preset", default="tc-c", choices=["tc-a", "tc-b", "tc-c", "tc-d"])
    ap.add_argument("--size", type=int, default=384)
    args = ap.parse_args(argv)

    import slicer_stub
    slicer_stub.install()
    import slicer
    from PIL import Image, ImageDraw
    import scipy.io

    module, _ = slicer_stub.loadModuleFile(REPO / "GBMMassEffect" / "GBMMassEffect.py")
    test = module.GBMMassEffectTest()
    logic = module.GBMMassEffectLogic()

    if args.labels == "glia" or not os.path.exists(args.labels):
        with scipy.io.netcdf_file(REPO / "Testing" / "Data" / "glia-testdata" / "atlas.nc", "r",
                                  mmap=False) as f:
            atlas = np.rint(f.variables["data"].data.astype(np.float32)).astype(np.uint8)
        labels = test.makeLabelVolume(atlas, "atlas labels")
    else:
        labels = logic.readVolume(args.labels, "atlas labels")
    # one forward run of the preset gives the synthetic patient (T1) and the overlays
    job = logic.simulate(labels, preset=args.preset, resolution=args.grid, device="cpu",
                         waitForCompletion=True, timeout=3600, keepJobFolder=True)
    if job.state != job.COMPLETED:
        raise SystemExit(f"forward run failed: {job.errorMessage}")
    t1 = logic.readVolume(os.path.join(job.outputFolder, "t1.nrrd"), "synthetic patient T1")
    seed = job.report["seed"]["ras_mm"]
    import shutil
    shutil.rmtree(job.folder, ignore_errors=True)
    logic.showResults(job.nodes, t1)

    # the Red view through the seed
    sliceLogic = slicer.mrmlScene._stubLogics[2][0]
    sliceNode = sliceLogic.GetSliceNode()
    sliceNode.SetDimensions(args.size, args.size, 1)
    sliceLogic.FitSliceToAll()
    sliceNode.SetSliceOffset(seed[2])
    composite = sliceLogic.GetSliceCompositeNode()
    layers = composite.GetNumberOfAdditionalLayers() if hasattr(composite, "GetNumberOfAdditionalLayers") else 0
    # Slicer sets a loaded volume's window/level automatically; here from percentiles
    t1Array = slicer.util.arrayFromVolume(t1)
    lo, hi = np.percentile(t1Array[t1Array > 0], [1, 99.5])
    t1.GetDisplayNode().AutoWindowLevelOff()
    t1.GetDisplayNode().SetWindowLevelMinMax(float(lo), float(hi))

    norm = job.nodes["displacementNorm"]
    # panel 1: the module's composite (T1, predicted tumor foreground, |u| layer), |u| hidden
    composite.SetNthLayerOpacity(3, 0.0)
    tumorPanel = slice_rgba(sliceLogic)
    # panel 2: T1 and the |u| overlay only
    composite.SetForegroundOpacity(0.0)
    composite.SetNthLayerOpacity(3, 0.6)
    normPanel = slice_rgba(sliceLogic)

    display = norm.GetDisplayNode()
    umax = display.GetWindowLevelMax()
    colorNode = display.GetColorNode()
    size = args.size
    bar_h = size - 90
    canvas = Image.new("RGB", (2 * size + 100, size + 24), (0, 0, 0))
    canvas.paste(Image.fromarray(tumorPanel[..., :3].astype(np.uint8)), (0, 24))
    canvas.paste(Image.fromarray(normPanel[..., :3].astype(np.uint8)), (size, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), f"T1 + predicted tumor c(1) (foreground, c > {logic.TUMOR_THRESHOLD})", fill=(255, 255, 255))
    draw.text((size + 8, 6), f"T1 + displacement |u| (mm, > {logic.DISPLACEMENT_THRESHOLD_MM} mm)", fill=(255, 255, 255))
    values = np.linspace(umax, 0.0, bar_h)
    colors = (lookup_rgb(colorNode, values, 0.0, umax) * 255).astype(np.uint8)
    x0, y0 = 2 * size + 16, 60
    for row, c in enumerate(colors):
        draw.line([(x0, y0 + row), (x0 + 18, y0 + row)], fill=tuple(int(v) for v in c))
    draw.text((x0 - 8, 40), "|u| (mm)", fill=(255, 255, 255))
    for frac in (0.0, 0.5, 1.0):
        y = y0 + int((1 - frac) * (bar_h - 1))
        draw.text((x0 + 24, y - 6), f"{frac * umax:.1f}", fill=(255, 255, 255))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}: slice through the seed, max|u| {umax:.2f} mm, additional layers {layers}, "
          f"max c {float(slicer.util.arrayFromVolume(job.nodes['tumor']).max()):.3f}")


if __name__ == "__main__":
    main()
