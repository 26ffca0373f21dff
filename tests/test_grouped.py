"""Pattern-grouped execution (compaction.compact(lowering="grouped")): one cropped conv per group of
filters with the same spatial footprint equals the masked model on every zoo CNN, at any batch
size, after export; the permutation never shows in outputs; the stored kernels shrink."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_compaction import MODELS, random_pattern_masks, setup, structured_masks

from sculpt_jax import compaction as C
from sculpt_jax import masking

MODELS.update({"mobilenet_v1_tiny": (16, {}), "resnet50_tiny": (16, {})})
CNNS = ["resnet8_tiny", "vgg_tiny", "mobilenet_v1_tiny", "mobilenet_v2_tiny", "resnet50_tiny"]


def _grouped(name, masks, **kw):
    model, v, x, graph, fwd = setup(name)
    kw.setdefault("lowering", "grouped")
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, **kw)
    return fn, cv, info, fwd(masking.apply_masks(v, masks), x)


@pytest.mark.parametrize("name, lowering", [(n, "grouped") for n in CNNS]
                         + [("resnet50_tiny", "taps")])  # fmt: skip
def test_grouped_equals_masked_with_removed_filters(name, lowering):
    _, v, x, graph, fwd = setup(name)
    masks = random_pattern_masks(graph, v, seed=0, low=0)  # ids 0..5: removed filters too
    fn, cv, info, ref = _grouped(name, masks, lowering=lowering)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-4, rtol=0)
    # counts describe the pruned model whatever the lowering (the documented exact relation)
    assert info["params"] == (
        info["masked_params"] - info["dropped_kernel_entries"] - info["dropped_affine_entries"]
    )
    if lowering == "taps":
        assert any("taps" in d for d in info["layers"])
        return
    grouped = [d for d in info["layers"] if "groups" in d]
    assert grouped, "no conv was grouped"
    for d in grouped:  # the groups hold every kept filter
        assert sum(g[-1] for g in d["groups"]) == d["out_after"]


def test_grouped_reference6_groups_and_storage():
    """On a plain 3x3 conv stack every reference6 pattern is its own group with a 3x1, 1x3, 3x2,
    2x3 or 3x3 kernel, and the stored kernel entries are exactly the masked ones."""
    _, v, x, graph, _ = setup("vgg_tiny")
    masks = random_pattern_masks(graph, v, seed=2, low=1)
    fn, cv, info, ref = _grouped("vgg_tiny", masks)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-4, rtol=0)
    shapes = {tuple(g[:2]) for d in info["layers"] for g in d.get("groups", [])}
    assert shapes == {(3, 1), (1, 3), (3, 2), (2, 3), (3, 3)}
    kernels = sum(g[0] * g[1] * g[2] * g[3] for d in info["layers"] for g in d.get("groups", []))
    assert kernels == sum(d["kept_kernel_entries"] for d in info["layers"] if "groups" in d)
    model, _, _, _, _ = setup("vgg_tiny")
    _, _, info_f = C.compact(model.apply, v, graph, masks, x)  # the filter lowering keeps zeros
    assert info["params"] == info_f["params"] == info["masked_params"]
    assert info["stored_params"] < info_f["stored_params"]
    assert info["stored_params"] - info["params"] < 0.1 * (info_f["stored_params"] - info["params"])


def test_grouped_residual_coupled_and_structured():
    """Coupled residual layers (whole stream channels removed) plus random patterns: the adds
    align differently permuted operands; resnet8_tiny at batch 1 and 4."""
    model, v, x, graph, fwd = setup("resnet8_tiny")
    m1 = structured_masks(graph, v)
    m2 = random_pattern_masks(graph, v, seed=3, low=0)
    masks = jax.tree.map(lambda a, b: a * b, m1, m2)
    fn, cv, info = C.compact(model.apply, v, graph, masks, x[:1], lowering="grouped")
    for b in (1, 4):
        xb = jax.random.normal(jax.random.key(b), (b, *x.shape[1:]))
        ref = fwd(masking.apply_masks(v, masks), xb)
        np.testing.assert_allclose(np.asarray(fn(cv, xb)), np.asarray(ref), atol=1e-4, rtol=0)
    plan_orders = [e["out"][0]["idx"] for e in info["plan"].values() if e["kind"] == "gconv"]
    assert any(o != sorted(o) for o in plan_orders), "no conv output was permuted"
    # coupled convs on the filter lowering: no gather left, same outputs
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, lowering="grouped",
                             group_coupled=False)  # fmt: skip
    ref = fwd(masking.apply_masks(v, masks), x)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-4, rtol=0)
    coupled = {li for grp in graph.coupled_groups if len(grp) > 1 for li in grp}
    grouped = {d["index"] for d in info["layers"] if "groups" in d}
    assert grouped and not grouped & coupled


def test_grouped_export_round_trip(tmp_path):
    model, v, x, graph, fwd = setup("resnet8_tiny")
    masks = random_pattern_masks(graph, v, seed=4, low=0)
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, lowering="grouped")
    C.save_compact(tmp_path / "g", cv, info)
    fn2, cv2, info2 = C.load_compact(tmp_path / "g", model.apply)
    assert info2["lowering"] == "grouped" and sorted(cv2) == sorted(cv)
    xb = jax.random.normal(jax.random.key(7), (5, *x.shape[1:]))
    ref = fwd(masking.apply_masks(v, masks), xb)
    np.testing.assert_allclose(np.asarray(fn2(cv2, xb)), np.asarray(ref), atol=1e-4, rtol=0)


def test_grouped_thresholds_and_vit_unchanged():
    _, v, x, graph, _ = setup("resnet8_tiny")
    masks = random_pattern_masks(graph, v, seed=5, low=1)
    _, _, info_wide, _ = _grouped("resnet8_tiny", masks, group_min_width=10**6)
    assert not any("groups" in d for d in info_wide["layers"])  # every conv left whole
    fn, cv, info, ref = _grouped("resnet8_tiny", masks, group_min_filters=10**6)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-4, rtol=0)
    assert all(len(d["groups"]) == 1 for d in info["layers"] if "groups" in d)  # all merged
    # a ViT has no spatial kernels to group: the grouped lowering is the filter lowering
    _, vv, xv, gv, _ = setup("vit_tiny")
    mv = random_pattern_masks(gv, vv, seed=0, low=0)
    fn, cv, info, ref = _grouped("vit_tiny", mv)
    np.testing.assert_allclose(np.asarray(fn(cv, xv)), np.asarray(ref), atol=1e-4, rtol=0)
    with pytest.raises(C.CompactError, match="lowering must be one of"):
        C.compact(setup("vit_tiny")[0].apply, vv, gv, mv, xv, lowering="nine_matmuls")


def test_footprint_groups_and_expand_any_order():
    foot = np.zeros((5, 3, 3), bool)
    foot[[0, 3], :, 2] = True  # right column
    foot[[1, 4]] = True  # full
    foot[2, 2, :] = True  # bottom row (a group of one)
    groups = C._footprint_groups(foot)
    assert [g.tolist() for g in groups] == [[0, 3], [1, 4], [2]]
    merged = C._footprint_groups(foot, min_filters=2)
    assert [g.tolist() for g in merged] == [[0, 3], [1, 4], [2]]
    merged = C._footprint_groups(foot, min_filters=3)
    assert [g.tolist() for g in merged] == [[0, 1, 2, 3, 4]]
    # an activation stored in a permuted order expands to the full width in channel order
    val = jnp.arange(6.0).reshape(1, 3, 2)  # channels stored as [2, 0, 3] of width 5
    a = C._A(val, C._Rep(1, np.asarray([2, 0, 3]), 5, np.full(5, -1.0, np.float32)))
    full = np.asarray(C._full(a))
    np.testing.assert_array_equal(full[0, :, 0], [2.0, -1.0, 0.0, 4.0, -1.0])


def test_taps_lowering_one_matmul_per_tap_and_export(tmp_path):
    """lowering="taps": nine shifted matmuls per 3x3 conv on contiguous filter runs (reference6's
    patterns admit one run per tap), strided convs included; equal after save/load."""
    model, v, x, graph, fwd = setup("resnet8_tiny")
    masks = random_pattern_masks(graph, v, seed=6, low=0)
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, lowering="taps")
    tapped = [d for d in info["layers"] if "taps" in d]
    assert tapped and all(d["taps"] <= 9 for d in tapped)
    C.save_compact(tmp_path / "t", cv, info)
    fn2, cv2, _ = C.load_compact(tmp_path / "t", model.apply)
    xb = jax.random.normal(jax.random.key(8), (3, *x.shape[1:]))
    ref = fwd(masking.apply_masks(v, masks), xb)
    np.testing.assert_allclose(np.asarray(fn2(cv2, xb)), np.asarray(ref), atol=1e-4, rtol=0)
    # the reference6 order: every tap's filters form one contiguous run
    foot = np.zeros((5, 3, 3), bool)
    for i, (rows, cols) in enumerate([((0, 3), (2, 3)), ((2, 3), (0, 3)), ((0, 3), (1, 3)),
                                      ((1, 3), (0, 3)), ((0, 3), (0, 3))]):  # fmt: skip
        foot[i, slice(*rows), slice(*cols)] = True
    groups = [np.asarray([i]) for i in range(5)]
    order = C._tap_order(groups, foot)
    runs = [C._runs(foot[order][:, r, c]) for r in range(3) for c in range(3)]
    assert all(len(r) == 1 for r in runs)
    assert order in ([0, 2, 4, 3, 1], [1, 3, 4, 2, 0])  # right col, right two, full, ... bottom row


def _fake_timer(per_layer, model=(1.0, 2.0), seen=None):
    """A deterministic `latency.Timer`: ``per_layer(name, lowering) -> ms`` for one conv alone,
    `model` = (ms with the per-layer choices, ms on the filter lowering) for whole models."""

    def timer(build, info):
        if seen is not None:
            seen.append((info, build()[1]))
        if info["layer"] is None:
            return model[0] if info["lowering"] == "per_layer" else model[1]
        return per_layer(info["layer"], info["lowering"])

    return timer


def test_auto_lowering_takes_each_convs_fastest_and_equals_masked(tmp_path):
    """lowering="auto": every conv on the lowering its timing says is fastest, one lowering per
    coupled (residual) group, the outputs those of the masked model at any batch and after export;
    the per-layer ops are timed at auto_batch."""
    model, v, x, graph, fwd = setup("resnet8_tiny")
    masks = random_pattern_masks(graph, v, seed=7, low=0)
    coupled = [grp for grp in graph.coupled_groups if len(grp) > 1]
    assert coupled
    first = {graph.layers[grp[0]].name for grp in coupled}
    # coupled-group leaders prefer taps alone, their partners grouped by more: the group sum wins
    cost = {"filters": 5.0, "grouped": 1.0, "taps": 2.0}
    lead = {"filters": 5.0, "grouped": 2.5, "taps": 2.0}
    seen = []
    timer = _fake_timer(lambda n, low: (lead if n in first else cost)[low], seen=seen)
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, lowering="auto", auto_batch=3,
                             timer=timer)  # fmt: skip
    low = {d["index"]: d.get("lowering") for d in info["layers"]}
    convs = [li for li, lw in low.items() if lw is not None]
    assert convs and all(low[li] == "grouped" for li in convs)
    for grp in coupled:
        assert len({low[li] for li in grp}) == 1
    assert info["auto_lowering"]["kept"] == "per_layer" and info["auto_lowering"]["batch"] == 3
    assert all(args[1].shape[0] == 3 for i, args in seen if i["layer"] is not None)
    assert set(info["auto_lowering"]["choices"].values()) == {"grouped"}
    for b in (1, 4):
        xb = jax.random.normal(jax.random.key(b), (b, *x.shape[1:]))
        ref = fwd(masking.apply_masks(v, masks), xb)
        np.testing.assert_allclose(np.asarray(fn(cv, xb)), np.asarray(ref), atol=1e-4, rtol=0)
    C.save_compact(tmp_path / "a", cv, info)
    fn2, cv2, info2 = C.load_compact(tmp_path / "a", model.apply)
    assert info2["lowering"] == "auto"
    np.testing.assert_allclose(np.asarray(fn2(cv2, x)), np.asarray(fwd(masking.apply_masks(
        v, masks), x)), atol=1e-4, rtol=0)  # fmt: skip


def test_auto_lowering_falls_back_when_the_whole_model_is_not_faster():
    model, v, x, graph, fwd = setup("vgg_tiny")
    masks = random_pattern_masks(graph, v, seed=8, low=1)
    timer = _fake_timer(lambda n, low: {"filters": 3.0, "grouped": 1.0, "taps": 2.0}[low],
                        model=(2.0, 1.5))  # fmt: skip
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, lowering="auto", timer=timer)
    rec = info["auto_lowering"]
    assert rec["kept"] == "filters" and rec["model_ms"] == {"per_layer": 2.0, "filters": 1.5}
    assert all(d.get("lowering") in (None, "filters") for d in info["layers"])
    assert all(t["ms"]["grouped"] == 1.0 and t["choice"] == "filters" for t in rec["layers"].values())
    ref = fwd(masking.apply_masks(v, masks), x)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-4, rtol=0)


def test_layer_lowerings_override_and_bad_names():
    """layer_lowerings pins single convs (over any rule and over "auto"'s measurement); the
    measured choices passed back rebuild the same model; a bad name or lowering fails first."""
    model, v, x, graph, fwd = setup("vgg_tiny")
    masks = random_pattern_masks(graph, v, seed=9, low=1)
    convs = [la.name for la in graph.layers if la.kind == "conv"]
    pin = {convs[0]: "taps", convs[1]: "grouped"}
    fn, cv, info = C.compact(model.apply, v, graph, masks, x, layer_lowerings=pin)
    low = {d["name"]: d.get("lowering") for d in info["layers"]}
    assert low[convs[0]] == "taps" and low[convs[1]] == "grouped"
    assert all(low[n] == "filters" for n in convs[2:])
    ref = fwd(masking.apply_masks(v, masks), x)
    np.testing.assert_allclose(np.asarray(fn(cv, x)), np.asarray(ref), atol=1e-4, rtol=0)
    timer = _fake_timer(lambda n, low: {"filters": 1.0, "grouped": 3.0, "taps": 2.0}[low])
    _, _, info = C.compact(model.apply, v, graph, masks, x, lowering="auto", timer=timer,
                           layer_lowerings=pin)  # fmt: skip
    low = {d["name"]: d.get("lowering") for d in info["layers"]}
    assert low[convs[0]] == "taps" and low[convs[1]] == "grouped"
    assert convs[0] not in info["auto_lowering"]["layers"]
    rec = C.choose_lowerings(model.apply, v, graph, masks, x, batch=2)  # real timings
    _, _, again = C.compact(model.apply, v, graph, masks, x, layer_lowerings=rec["choices"])
    got = {d["name"]: d.get("lowering") for d in again["layers"] if d["name"] in rec["choices"]}
    assert got == rec["choices"] and rec["kept"] in ("per_layer", "filters")
    with pytest.raises(C.CompactError, match="not a layer of this model"):
        C.compact(model.apply, v, graph, masks, x, layer_lowerings={"conv_typo": "taps"})
    with pytest.raises(C.CompactError, match="must be one of"):
        C.compact(model.apply, v, graph, masks, x, layer_lowerings={convs[0]: "fast"})
