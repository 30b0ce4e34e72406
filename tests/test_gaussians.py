"""Tests of gen3diffusion.gaussians: activations (closed forms, ranges), the container, and .ply round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gen3diffusion.gaussians import SH_C0, Gaussians, activate, load_ply, save_ply

HALF_ULP_AT_ONE = 2.0**-24  # float32: spacing(1) / 2 = unit roundoff


def _random_gaussians(batch: int, n: int, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    return activate(torch.randn(batch, n, 14, generator=gen) * 3)


def _write_ply(path, columns: dict[str, np.ndarray], fmt: str = "binary_little_endian") -> None:
    """An independent minimal PLY writer: one vertex element, properties in the given order and dtypes."""
    types = {"f4": "float", "f8": "double", "u1": "uchar", "i4": "int"}
    names = list(columns)
    header = ["ply", f"format {fmt} 1.0", "comment written by the test", f"element vertex {len(columns[names[0]])}"]
    header += [f"property {types[columns[n].dtype.str[1:]]} {n}" for n in names] + ["end_header"]
    record = np.empty(len(columns[names[0]]), dtype=[(n, columns[n].dtype.newbyteorder("<")) for n in names])
    for n in names:
        record[n] = columns[n]
    path.write_bytes(("\n".join(header) + "\n").encode() + record.tobytes())


def _standard_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2"]
    columns = {name: rng.normal(size=n).astype(np.float32) for name in names}
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    columns.update({f"rot_{k}": quats[:, k].astype(np.float32) for k in range(4)})
    return columns


# ---------------------------------------------------------------------------------------------- activations


def test_activate_closed_form_at_zero():
    raw = torch.zeros(2, 3, 14)
    raw[..., 7] = 1.0  # quaternion (1, 0, 0, 0) -> identity
    g = activate(raw)
    assert (g.batch_size, g.num_gaussians) == (2, 3)
    assert torch.equal(g.means, torch.zeros(2, 3, 3))
    assert torch.equal(g.opacities, torch.full((2, 3), 0.5))
    torch.testing.assert_close(g.scales, torch.full((2, 3, 3), 0.1 * math.log(2.0)))
    assert torch.equal(g.rotations, torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(2, 3, 4))
    assert torch.equal(g.colors, torch.full((2, 3, 3), 0.5))


def test_activate_ranges_and_channel_layout():
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(2, 500, 14, generator=gen, dtype=torch.float64) * 4
    g = activate(raw)
    assert g.means.abs().max() <= 1 and (g.means.abs() == 1).any()  # clamped, and clamping happened
    torch.testing.assert_close(g.means, raw[..., 0:3].clamp(-1, 1), atol=0, rtol=0)
    assert ((g.opacities > 0) & (g.opacities < 1)).all()
    torch.testing.assert_close(g.opacities, 1 / (1 + torch.exp(-raw[..., 3])))
    assert (g.scales > 0).all()
    torch.testing.assert_close(g.scales, 0.1 * torch.log1p(torch.exp(raw[..., 4:7])))
    torch.testing.assert_close(g.rotations.norm(dim=-1), torch.ones(2, 500, dtype=torch.float64))
    torch.testing.assert_close(g.rotations * raw[..., 7:11].norm(dim=-1, keepdim=True), raw[..., 7:11])
    assert ((g.colors >= 0) & (g.colors <= 1)).all()
    torch.testing.assert_close(g.colors, 1 / (1 + torch.exp(-2 * raw[..., 11:14])))  # 0.5 tanh(x) + 0.5


def test_activate_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[B, N, 14\]"):
        activate(torch.zeros(3, 14))


# ---------------------------------------------------------------------------------------------- container


def test_container_indexing_cat_to_detach():
    g = _random_gaussians(3, 7)
    one = g[1]
    assert one.batch_size == 1 and one.num_gaussians == 7
    assert torch.equal(one.means[0], g.means[1]) and torch.equal(one.opacities[0], g.opacities[1])
    assert torch.equal(g[-1].colors, g.colors[2:])
    assert g[0:2].batch_size == 2
    with pytest.raises(IndexError):
        g[3]
    both = Gaussians.cat([g, g[0:3]], dim=1)
    assert (both.batch_size, both.num_gaussians) == (3, 14)
    stacked = Gaussians.cat([g, one], dim=0)
    assert (stacked.batch_size, stacked.num_gaussians) == (4, 7)
    assert torch.equal(stacked.rotations[3], g.rotations[1])
    g64 = g.to(torch.float64)
    assert g64.dtype == torch.float64 and g64.opacities.dtype == torch.float64
    raw = torch.zeros(1, 2, 14, requires_grad=True)
    assert activate(raw).means.requires_grad and not activate(raw).detach().means.requires_grad


def test_container_rejects_inconsistent_shapes():
    g = _random_gaussians(2, 5)
    with pytest.raises(ValueError, match="opacities"):
        Gaussians(g.means, g.scales, g.rotations, g.opacities[..., None], g.colors)
    with pytest.raises(ValueError, match="rotations"):
        Gaussians(g.means, g.scales, g.rotations[:, :4], g.opacities, g.colors)


# ---------------------------------------------------------------------------------------------- ply


def test_ply_round_trip(tmp_path):
    """Save -> load reproduces float32 Gaussians to float32 rounding.

    Means and (unit) rotations are stored verbatim: bit-exact. The other fields pass through one float32 rounding
    of the stored value (relative error u = 2^-24) and one rounding of the result (half a spacing):
    - colour: f_dc = (rgb - 0.5) / C0, so |d rgb| <= |rgb - 0.5| u + spacing(rgb) / 2 <= 2^-24 (one float32 ulp
      near 1);
    - opacity: L = logit(o), d o = o (1 - o) |L| u, plus spacing(o) / 2;
    - scale: log s, d s = s |log s| u, plus spacing(s) / 2.
    """
    g = _random_gaussians(1, 2000)
    g.opacities[0, :10] = 1.0  # float32 saturation of the sigmoid: stored as logit(1 - 2^-24)
    path = tmp_path / "gs.ply"
    assert save_ply(g, path, min_opacity=0.0) == 2000
    back = load_ply(path)
    assert back.dtype == torch.float32 and back.num_gaussians == 2000
    assert torch.equal(back.means, g.means)
    assert torch.equal(back.rotations, g.rotations)
    u = HALF_ULP_AT_ONE

    def check(name: str, got: torch.Tensor, want: torch.Tensor, propagated: np.ndarray) -> None:
        want64 = want.double().numpy()
        bound = propagated + np.spacing(want.numpy()).astype(np.float64) / 2
        err = np.abs(got.double().numpy() - want64)
        assert (err <= bound).all(), f"{name}: worst excess {(err - bound).max():.3g}"

    rgb = g.colors.double().numpy()
    check("colors", back.colors, g.colors, np.abs(rgb - 0.5) * u)
    o = g.opacities.double().numpy().clip(None, 1 - u)
    check("opacities", back.opacities, g.opacities, o * (1 - o) * np.abs(np.log(o / (1 - o))) * u)
    s = g.scales.double().numpy()
    check("scales", back.scales, g.scales, s * np.abs(np.log(s)) * u)
    assert (np.abs(back.colors.numpy() - g.colors.numpy()) <= 2.0**-24).all()  # at most one ulp near 1


def test_ply_header_layout(tmp_path):
    path = tmp_path / "gs.ply"
    save_ply(_random_gaussians(1, 3), path)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    lines = header.splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 3"]
    expected = "x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3"
    assert lines[3:] == [f"property float {name}" for name in expected.split()]
    assert len(path.read_bytes()) == len(header) + len("end_header\n") + 3 * 17 * 4


def test_ply_stored_values_follow_3dgs_conventions(tmp_path):
    raw = torch.zeros(1, 1, 14)
    raw[..., 7] = 1.0
    path = tmp_path / "one.ply"
    save_ply(activate(raw), path)
    values = np.frombuffer(path.read_bytes()[-17 * 4 :], dtype="<f4")
    np.testing.assert_array_equal(values[3:10], 0.0)  # normals, f_dc of rgb 0.5, logit of opacity 0.5
    np.testing.assert_allclose(values[10:13], np.log(0.1 * np.log(2.0)), rtol=1e-6)
    np.testing.assert_array_equal(values[13:], [1.0, 0.0, 0.0, 0.0])


def test_ply_prunes_low_opacity(tmp_path):
    g = _random_gaussians(1, 500, seed=2)
    g.opacities[0, :40] = 0.004  # below the default threshold
    g.opacities[0, 40:50] = 0.005  # at the threshold: kept
    expected = int((g.opacities >= 0.005).sum())
    path = tmp_path / "pruned.ply"
    assert save_ply(g, path) == expected
    back = load_ply(path)
    assert back.num_gaussians == expected
    keep = g.opacities[0] >= 0.005
    assert torch.equal(back.means[0], g.means[0, keep])
    assert save_ply(g, path, min_opacity=0.5) == int((g.opacities >= 0.5).sum())


def test_ply_requires_single_sample(tmp_path):
    with pytest.raises(ValueError, match="batch of 2"):
        save_ply(_random_gaussians(2, 3), tmp_path / "x.ply")


def test_ply_write_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "out" / "gs.ply"
    save_ply(_random_gaussians(1, 5, seed=3), path)
    save_ply(_random_gaussians(1, 8, seed=4), path)
    assert load_ply(path).num_gaussians == 8
    assert [p.name for p in path.parent.iterdir()] == ["gs.ply"]  # no temporary file left behind


def test_ply_missing_property_names_file_and_property(tmp_path):
    columns = _standard_columns(4)
    del columns["scale_1"]
    path = tmp_path / "missing.ply"
    _write_ply(path, columns)
    with pytest.raises(ValueError, match=r"missing\.ply.*scale_1"):
        load_ply(path)


def test_ply_ignores_extra_properties_in_any_order(tmp_path):
    """A 3DGS training file: normals, 45 f_rest_*, a uchar and a double field, properties shuffled."""
    n = 6
    columns = _standard_columns(n, seed=5)
    rng = np.random.default_rng(6)
    columns["rot_0"] = columns["rot_0"] * 3  # raw 3DGS quaternions are not normalised
    extra = {f"f_rest_{k}": rng.normal(size=n).astype(np.float32) for k in range(45)}
    extra.update(nx=np.zeros(n, np.float32), label=np.arange(n, dtype=np.uint8), weight=rng.normal(size=n))
    merged = {**columns, **extra}
    order = rng.permutation(list(merged))
    path = tmp_path / "trained.ply"
    _write_ply(path, {name: merged[name] for name in order})
    g = load_ply(path)
    assert g.num_gaussians == n
    np.testing.assert_array_equal(g.means[0].numpy(), np.stack([columns[k] for k in "xyz"], axis=1))
    np.testing.assert_allclose(g.opacities[0].numpy(), 1 / (1 + np.exp(-columns["opacity"].astype(np.float64))))
    np.testing.assert_allclose(g.scales[0, :, 1].numpy(), np.exp(columns["scale_1"].astype(np.float64)), rtol=1e-6)
    rgb = np.clip(0.5 + SH_C0 * columns["f_dc_2"].astype(np.float64), 0, 1)
    np.testing.assert_allclose(g.colors[0, :, 2].numpy(), rgb, atol=1e-7)
    quats = np.stack([columns[f"rot_{k}"] for k in range(4)], axis=1).astype(np.float64)
    np.testing.assert_allclose(g.rotations[0].numpy(), quats / np.linalg.norm(quats, axis=1, keepdims=True), atol=1e-7)


@pytest.mark.parametrize("kind", ["not_ply", "ascii", "big_endian", "truncated", "no_end_header"])
def test_ply_rejects_bad_files(tmp_path, kind):
    path = tmp_path / f"{kind}.ply"
    if kind == "not_ply":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        match = "not a PLY"
    elif kind in ("ascii", "big_endian"):
        _write_ply(path, _standard_columns(3), fmt=kind.replace("big_endian", "binary_big_endian"))
        match = "binary_little_endian"
    elif kind == "truncated":
        save_ply(_random_gaussians(1, 10), path)
        path.write_bytes(path.read_bytes()[:-5])
        match = "truncated"
    else:
        path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\n")
        match = "end_header"
    with pytest.raises(ValueError, match=match) as info:
        load_ply(path)
    assert path.name in str(info.value)
