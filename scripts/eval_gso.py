"""Evaluate image -> 3D on Google Scanned Objects (or any folder of meshes / posed views), resumably.

    python scripts/eval_gso.py --data GSO_ROOT --output eval/gso --weights path/or/hub-id
    python scripts/eval_gso.py --data GSO_ROOT --object-list gso30.txt --lpips-weights alexnet-owt-7be5be79.pth \
        --fid-weights pt_inception-2015-12-05-6726825d.pth --fscore-threshold 0.02 --normalization "[-1,1]"

Per object: ground truth on the 32-view evaluation ring (meshes rendered, or stored views), one sample from ring
view 0, PSNR / SSIM / LPIPS on the ring, geometry metrics of the extracted mesh against the GT mesh. Writes
<output>/objects/<name>.json as each object finishes (a rerun skips those; --overwrite redoes them), contact sheets
in <output>/sheets/, and summary.csv / summary.md / summary.json (means over objects, set-level FID, counts, the
metric conventions). A failing object is reported by name and recorded; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gen3diffusion.cli import add_model_arguments, load_pipeline, sampler_config
from gen3diffusion.eval.geometry import NORMALIZATIONS, GeometryMetricConfig
from gen3diffusion.eval.image_metrics import SSIM_VARIANTS
from gen3diffusion.eval.runner import EvalConfig, Evaluator, summary_markdown
from gen3diffusion.mesh import MeshConfig
from gen3diffusion.pipeline import BORDER_RATIO

logger = logging.getLogger("eval_gso")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    e, g, m = EvalConfig, GeometryMetricConfig, MeshConfig
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("data and outputs")
    io.add_argument("--data", required=True, help="objects root: mesh files, GSO folders, folder-format objects")
    io.add_argument("--output", default="eval", help="output folder (objects/, renders/, sheets/, summary.*)")
    io.add_argument("--object-list", default=None, help="text file, one object name per line: only these")
    io.add_argument("--num-objects", type=int, default=None, help="only the first N objects")
    io.add_argument("--overwrite", action="store_true", help="re-evaluate objects whose JSON exists")
    io.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    model = p.add_argument_group("model and sampling")
    add_model_arguments(model)
    model.add_argument("--task", choices=sorted(BORDER_RATIO), default=e.task,
                       help="input border ratio (objects 0.45, avatars 0.227) and GT mesh extent (0.8, 1.0)")
    model.add_argument("--border-ratio", type=float, default=None, help="override the task's border ratio")
    model.add_argument("--no-recenter", action="store_true",
                       help="take ring view 0 as it is (the bundled demo model was trained on uncropped views)")
    model.add_argument("--seed", type=int, default=e.seed, help="sampling seed of every object")
    ring = p.add_argument_group("ground truth and ring")
    ring.add_argument("--ring-size", type=int, default=e.ring_size, help="views on the elevation-0 ring")
    ring.add_argument("--image-size", type=int, default=e.image_size, help="pixels per side of the compared views")
    ring.add_argument("--gt-supersample", type=int, default=e.gt_supersample, help="GT mesh samples per pixel/axis")
    ring.add_argument("--gt-shading", choices=["hemisphere", "albedo"], default=e.gt_shading)
    ring.add_argument("--mesh-up-axis", choices=["auto", "y", "z"], default=e.mesh_up_axis,
                      help="up axis of mesh files (auto: y for .glb/.gltf, z for GSO .obj and others)")
    ring.add_argument("--sheet-views", type=int, default=e.sheet_views, help="ring views per contact-sheet row")
    metrics = p.add_argument_group("metrics and their conventions")
    metrics.add_argument("--ssim-variant", choices=sorted(SSIM_VARIANTS), default=e.ssim_variant)
    metrics.add_argument("--lpips-net", choices=["alex", "vgg"], default=e.lpips_net)
    metrics.add_argument("--lpips-weights", default=None, help="LPIPS trunk file (else $LPIPS_BACKBONE, hub cache)")
    metrics.add_argument("--fid-features", choices=["inception", "clip"], default=e.fid_features)
    metrics.add_argument("--fid-weights", default=None, help="Inception file / CLIP folder (else env var, hub cache)")
    metrics.add_argument("--geometry", action=argparse.BooleanOptionalAction, default=e.geometry,
                         help="extract the predicted mesh and compute geometry metrics")
    metrics.add_argument("--fscore-threshold", type=float, default=g.fscore_threshold, help="normalised units")
    metrics.add_argument("--normalization", choices=NORMALIZATIONS, default=g.normalization)
    metrics.add_argument("--normalize-by", choices=["each", "gt"], default=g.normalize_by)
    metrics.add_argument("--icp", action=argparse.BooleanOptionalAction, default=g.icp, help="align by ICP")
    metrics.add_argument("--icp-scale", action=argparse.BooleanOptionalAction, default=g.icp_scale,
                         help="similarity (with scale) rather than rigid ICP")
    metrics.add_argument("--chamfer-reduction", choices=["mean", "sum"], default=g.chamfer_reduction)
    metrics.add_argument("--chamfer-squared", action="store_true", help="Chamfer of squared distances")
    metrics.add_argument("--distance-scale", type=float, default=g.distance_scale, help="factor on CD and P2S")
    metrics.add_argument("--p2s-direction", choices=["pred_to_gt", "gt_to_pred"], default=g.p2s_direction)
    metrics.add_argument("--geometry-samples", type=int, default=g.num_samples, help="surface samples per mesh")
    metrics.add_argument("--mesh-views", type=int, default=m.num_views, help="depth views fused into the mesh")
    metrics.add_argument("--mesh-resolution", type=int, default=m.resolution, help="size of those views")
    metrics.add_argument("--mesh-voxels", type=int, default=m.voxels, help="TSDF voxels per side")
    return p.parse_args(argv)


def build_configs(args: argparse.Namespace) -> tuple[EvalConfig, GeometryMetricConfig, MeshConfig]:
    cfg = EvalConfig(
        data=args.data, output=args.output, object_list=args.object_list, num_objects=args.num_objects,
        overwrite=args.overwrite, weights=args.weights, base=args.base, task=args.task,
        border_ratio=args.border_ratio, recenter=not args.no_recenter, seed=args.seed, ring_size=args.ring_size, image_size=args.image_size,
        gt_supersample=args.gt_supersample, gt_shading=args.gt_shading, mesh_up_axis=args.mesh_up_axis,
        sheet_views=args.sheet_views, geometry=args.geometry, ssim_variant=args.ssim_variant,
        lpips_net=args.lpips_net, lpips_weights=args.lpips_weights, fid_features=args.fid_features,
        fid_weights=args.fid_weights,
    )
    geometry = GeometryMetricConfig(
        num_samples=args.geometry_samples, normalization=args.normalization, normalize_by=args.normalize_by,
        icp=args.icp, icp_scale=args.icp_scale,
        icp_num_points=min(args.geometry_samples, GeometryMetricConfig.icp_num_points),  # so describe() is exact
        chamfer_reduction=args.chamfer_reduction, chamfer_squared=args.chamfer_squared,
        distance_scale=args.distance_scale, p2s_direction=args.p2s_direction, fscore_threshold=args.fscore_threshold,
    )
    mesh = MeshConfig(num_views=args.mesh_views, resolution=args.mesh_resolution, voxels=args.mesh_voxels)
    return cfg, geometry, mesh


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg, geometry_cfg, mesh_cfg = build_configs(args)
        pipe = load_pipeline(args)
        pipe.progress = False  # one bar over the objects is enough
        sampler_cfg = sampler_config(args, pipe)
        evaluator = Evaluator(pipe, cfg, sampler_cfg, mesh_cfg, geometry_cfg)
        summary = evaluator.run(progress=not args.quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        logger.error("%s", err)
        return 2
    print(summary_markdown(summary, per_object=False))
    if summary.failed:
        logger.error("%d of %d objects failed: %s", len(summary.failed), summary.counts["listed"],
                     ", ".join(summary.failed))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
