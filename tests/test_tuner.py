"""The MG_EDIT PEFT adapter type: config, layers, tuner, registration, save/load, bad input."""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import mg_editing  # noqa: F401  registers MG_EDIT
from mg_editing.architecture import get_architecture, weight_out_in
from mg_editing.locations import GRANULARITIES, Locations
from mg_editing.tuner import MGEditConfig, MGEditLayer, MGEditModel
from mg_editing.tuner import registration

from conftest import FAMILIES, make_model

LAYER = 1
#: one square attention output (GPT-2's c_proj is a square Conv1D) and one rectangular MLP weight
ROLES = {
    "gpt2": ("attn.c_proj", "mlp.c_fc"),
    "codegen": ("attn.out_proj", "mlp.fc_out"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "stablelm": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma": ("self_attn.o_proj", "mlp.down_proj"),
}
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: thread hand-offs cost more than they save, above all on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_locations(model, family: str, granularity: str, k: int = 4, n: int = 10, seed: int = 0) -> Locations:
    """Random rows, and neurons inside those rows, in two modules of layer ``LAYER``."""
    arch = get_architecture(model)
    names = [f"{arch.layer_name(LAYER)}.{role}" for role in ROLES[family]]
    gen = torch.Generator().manual_seed(seed)
    rows, neurons = {}, {}
    for name in names:
        out_f, in_f = weight_out_in(model.get_submodule(name)).shape
        r = torch.randperm(out_f, generator=gen)[:k].sort().values
        pairs = torch.stack([r.repeat_interleave(in_f), torch.arange(in_f).repeat(k)])
        neurons[name] = pairs[:, torch.randperm(pairs.shape[1], generator=gen)[:n]]
        rows[name] = r
    locs = Locations("neuron", modules=names, layer=LAYER, rows=rows, neurons=neurons)
    return locs if granularity == "neuron" else locs.coarsen(granularity)


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 600, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def randomise_deltas(model, seed: int = 1, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mg_edit_delta" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def mg_layers(model) -> dict[str, MGEditLayer]:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return {n: m for n, m in inner.named_modules() if isinstance(m, MGEditLayer)}


def hand_edited(base, peft_model, locs: Locations, adapter: str = "default"):
    """A deep copy of ``base`` with each adapted weight edited by hand (independent of the layer code)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in mg_layers(peft_model).items():
            if adapter not in layer.mg_edit_delta:
                continue
            delta = layer.mg_edit_delta[adapter].detach().clone()
            module = ref.get_submodule(name)
            w = module.weight  # Linear: out x in, Conv1D: in x out
            conv = isinstance(module, Conv1D)
            g = locs.granularity
            if g == "row":
                r = locs.rows[name]
                for j, row in enumerate(r.tolist()):
                    if conv:
                        w[:, row] += delta[j]
                    else:
                        w[row, :] += delta[j]
            elif g == "neuron":
                for j, (row, col) in enumerate(locs.neurons[name].t().tolist()):
                    if conv:
                        w[col, row] += delta[j]
                    else:
                        w[row, col] += delta[j]
            else:
                w += delta.t() if conv else delta
    return ref


def expected_trainable(model, locs: Locations) -> int:
    arch = get_architecture(model)
    if locs.granularity == "full":
        return sum(m.weight.numel() for m in arch.weight_modules().values())
    if locs.granularity == "layer":
        return sum(m.weight.numel() for m in arch.weight_modules(locs.layer).values())
    if locs.granularity == "module":
        return sum(model.get_submodule(n).weight.numel() for n in locs.modules)
    if locs.granularity == "row":
        return sum(len(r) * weight_out_in(model.get_submodule(n)).shape[1] for n, r in locs.rows.items())
    return locs.num_neurons


def no_adapter_left(model) -> bool:
    return not mg_layers(model) and not hasattr(model, "peft_config")


# -- every family x every granularity ----------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_forward_merge_unmerge(family, granularity):
    base = make_model(family)
    ref_base = copy.deepcopy(base)
    x = inputs()
    base_logits = logits(ref_base, x)
    locs = make_locations(base, family, granularity)
    pm = get_peft_model(base, MGEditConfig(granularity=granularity, locations=locs))

    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".mg_edit_delta." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected_trainable(ref_base, locs)
    assert pm.get_nb_trainable_parameters()[0] == expected_trainable(ref_base, locs)
    assert torch.equal(logits(pm, x), base_logits)  # zero deltas: exactly the base model

    randomise_deltas(pm)
    ref = hand_edited(ref_base, pm, locs)
    unmerged = logits(pm, x)
    torch.testing.assert_close(unmerged, logits(ref, x), **TOL)
    assert not torch.allclose(unmerged, base_logits, atol=1e-4)

    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, x), base_logits, atol=0, rtol=0)

    pm.base_model.merge_adapter()
    torch.testing.assert_close(logits(pm, x), unmerged, **TOL)
    pm.base_model.unmerge_adapter()
    ref_sd = ref_base.state_dict()
    for name, p in pm.get_base_model().state_dict().items():
        if "mg_edit" not in name:
            torch.testing.assert_close(p, ref_sd[name.replace(".base_layer", "")], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(logits(pm, x), unmerged, **TOL)

    for name, layer in mg_layers(pm).items():  # get_delta_weight is in the base weight's own layout
        edited = ref.get_submodule(name).weight - ref_base.get_submodule(name).weight
        torch.testing.assert_close(layer.get_delta_weight("default"), edited, atol=1e-6, rtol=0)

    merged = pm.merge_and_unload()
    assert not mg_layers(merged)
    ref_sd = ref.state_dict()
    assert merged.state_dict().keys() == ref_sd.keys()
    for name, p in merged.state_dict().items():
        torch.testing.assert_close(p, ref_sd[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(logits(merged, x), logits(ref, x), **TOL)


TRAIN_CASES = [(f, g) for f in FAMILIES for g in ("row", "neuron")] + [("gpt2", "module"), ("codegen", "layer")]


@pytest.mark.parametrize("family,granularity", TRAIN_CASES)
def test_training_changes_only_located_parameters(family, granularity):
    base = make_model(family)
    ref_base = copy.deepcopy(base)
    locs = make_locations(base, family, granularity)
    pm = get_peft_model(base, MGEditConfig(granularity=granularity, locations=locs))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = inputs()
    pm.train()
    for _ in range(3):
        loss = pm(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    # the base weights themselves are never touched by training
    for name, p in pm.get_base_model().named_parameters():
        if "mg_edit" not in name:
            assert torch.equal(p, ref_base.get_parameter(name.replace(".base_layer", ""))), name

    merged = pm.merge_and_unload().state_dict()
    if granularity == "layer":
        locs = Locations("module", modules=sorted(get_architecture(ref_base).weight_modules(LAYER)), layer=LAYER)
    located = {f"{n}.weight": n for n in locs.modules}
    for key, ref in ref_base.state_dict().items():
        got = merged[key]
        if key not in located:
            assert torch.equal(got, ref), key  # biases included
            continue
        module = ref_base.get_submodule(located[key])
        changed = (weight_out_in(module) != (got.t() if isinstance(module, Conv1D) else got))
        mask = torch.zeros_like(changed)
        if granularity == "row":
            mask[locs.rows[located[key]]] = True
        elif granularity == "neuron":
            r, c = locs.neurons[located[key]]
            mask[r, c] = True
        else:
            mask[:] = True
        assert not changed[~mask].any(), key
        assert changed[mask].float().mean() > 0.9, key


# -- save / load ---------------------------------------------------------------------------------
SAVE_CASES = [(f, "row") for f in FAMILIES] + [("gpt2", "neuron"), ("llama", "neuron"), ("codegen", "module")]


@pytest.mark.parametrize("family,granularity", SAVE_CASES)
def test_save_and_load_roundtrip(family, granularity, tmp_path):
    base = make_model(family)
    locs = make_locations(base, family, granularity)
    pm = get_peft_model(base, MGEditConfig(granularity=granularity, locations=locs))
    randomise_deltas(pm)
    x = inputs()
    expected = logits(pm, x)
    pm.save_pretrained(tmp_path)

    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {"delta"} if granularity == "module" else {"delta", "index"}
    assert {f"base_model.model.{n}.mg_edit_{k}" for n in locs.modules for k in kinds} == set(tensors)
    if granularity == "row":
        for n, r in locs.rows.items():
            assert torch.equal(tensors[f"base_model.model.{n}.mg_edit_index"], r)
    if granularity == "neuron":
        for n, nn_ in locs.neurons.items():
            assert torch.equal(tensors[f"base_model.model.{n}.mg_edit_index"], nn_)
    raw = (tmp_path / "adapter_config.json").read_text()
    assert len(raw) < 4096
    cfg = json.loads(raw)
    assert cfg["peft_type"] == "MG_EDIT" and cfg["granularity"] == granularity
    assert "rows" not in cfg["locations"] and "neurons" not in cfg["locations"]
    if granularity != "module":
        counts = cfg["locations"]["num_rows" if granularity == "row" else "num_neurons"]
        assert counts == {n: 4 if granularity == "row" else 10 for n in locs.modules}

    fresh = make_model(family)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded.base_model, MGEditModel)
    assert isinstance(loaded.peft_config["default"], MGEditConfig)
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-6, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), expected, **TOL)


def test_load_in_fresh_process_after_import(tmp_path):
    """Only ``import mg_editing`` is needed for PEFT's public loading API (registration on import)."""
    import subprocess
    import sys

    base = make_model("codegen")
    locs = make_locations(base, "codegen", "row")
    pm = get_peft_model(base, MGEditConfig(granularity="row", locations=locs))
    randomise_deltas(pm)
    pm.save_pretrained(tmp_path / "adapter")
    torch.save(logits(pm, inputs()), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import mg_editing
from peft import PeftModel, PeftConfig
from conftest import make_model
cfg = PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})
assert type(cfg).__name__ == "MGEditConfig", type(cfg)
model = PeftModel.from_pretrained(make_model("codegen"), {str(tmp_path / 'adapter')!r})
x = torch.randint(0, 600, (2, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    got = model.merge_and_unload()(x).logits
torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-5, rtol=1e-5)
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_adapter_size_for_codegen_350m_dims(tmp_path):
    """Row (~120 rows) and neuron (~10k) adapters on a CodeGen-350M-shaped fc_out, built on the meta device."""
    from transformers import AutoModelForCausalLM, CodeGenConfig

    config = CodeGenConfig(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32, vocab_size=51200, n_positions=2048, n_ctx=2048)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    base_bytes_fp32, base_bytes_fp16 = 4 * n_params, 2 * n_params
    name = "transformer.h.10.mlp.fc_out"
    fc_out = model.get_submodule(name)
    assert weight_out_in(fc_out).shape == (1024, 4096)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(1024, generator=gen)[:120].sort().values
    pairs = torch.stack([rows.repeat_interleave(4096), torch.arange(4096).repeat(120)])
    neurons = pairs[:, torch.randperm(pairs.shape[1], generator=gen)[:10_000]]
    locs = Locations("neuron", modules=[name], layer=10, rows={name: rows}, neurons={name: neurons})

    sizes = {}
    for granularity in ("row", "neuron"):
        m = copy.deepcopy(model)
        m.get_submodule(name).to_empty(device="cpu")  # only the located module is materialised
        pm = get_peft_model(m, MGEditConfig(granularity=granularity, locations=locs if granularity == "neuron" else locs.coarsen("row")))
        pm.save_pretrained(tmp_path / granularity)
        sizes[granularity] = os.path.getsize(tmp_path / granularity / "adapter_model.safetensors")
        assert os.path.getsize(tmp_path / granularity / "adapter_config.json") < 4096
    row_frac, neuron_frac = sizes["row"] / base_bytes_fp16, sizes["neuron"] / base_bytes_fp16
    print(
        f"\nCodeGen-350M dims: {n_params / 1e6:.1f}M params = {base_bytes_fp32 / 2**20:.0f} MiB fp32 / "
        f"{base_bytes_fp16 / 2**20:.0f} MiB fp16; row adapter (120 rows) {sizes['row'] / 2**20:.2f} MiB = "
        f"{100 * row_frac:.3f}% of fp16 ({50 * row_frac:.3f}% of fp32); neuron adapter (10k) "
        f"{sizes['neuron'] / 2**10:.0f} KiB = {100 * neuron_frac:.4f}% of fp16 ({50 * neuron_frac:.4f}% of fp32)"
    )
    assert row_frac < 0.01
    assert neuron_frac < 0.001


# -- several adapters --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "codegen"])
def test_several_adapters(family, tmp_path):
    base = make_model(family)
    ref_base = copy.deepcopy(base)
    x = inputs()
    locs_a = make_locations(base, family, "row", seed=0)
    locs_b = make_locations(base, family, "neuron", seed=1)
    pm = get_peft_model(base, MGEditConfig(granularity="row", locations=locs_a), adapter_name="a")
    pm.add_adapter("b", MGEditConfig(granularity="neuron", locations=locs_b))
    randomise_deltas(pm, seed=3)
    layer = mg_layers(pm)[locs_a.modules[0]]
    assert set(layer.mg_edit_kind) == {"a", "b"}
    ref_a, ref_b = hand_edited(ref_base, pm, locs_a, "a"), hand_edited(ref_base, pm, locs_b, "b")
    ref_ab = hand_edited(ref_a, pm, locs_b, "b")

    assert pm.active_adapter == "a"
    assert all(n.split(".")[-1] == "a" for n, p in pm.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(pm, x), logits(ref_a, x), **TOL)
    pm.set_adapter("b")
    assert all(n.split(".")[-1] == "b" for n, p in pm.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(pm, x), logits(ref_b, x), **TOL)
    pm.base_model.set_adapter(["a", "b"])
    both = logits(pm, x)
    torch.testing.assert_close(both, logits(ref_ab, x), **TOL)
    pm.base_model.merge_adapter()
    torch.testing.assert_close(logits(pm, x), both, **TOL)
    pm.base_model.unmerge_adapter()

    pm.save_pretrained(tmp_path)  # non-default adapters go to sub-folders named after them
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.set_adapter("b")
    torch.testing.assert_close(logits(loaded, x), logits(ref_b, x), **TOL)

    pm.delete_adapter("b")
    pm.set_adapter("a")
    assert set(layer.mg_edit_kind) == {"a"} and "b" not in layer.mg_edit_index
    torch.testing.assert_close(logits(pm, x), logits(ref_a, x), **TOL)
    merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), logits(ref_a, x), **TOL)


# -- config ----------------------------------------------------------------------------------------
def test_config_validation_and_coarsening():
    model = make_model("codegen")
    neuron = make_locations(model, "codegen", "neuron")
    with pytest.raises(ValueError, match="unknown granularity"):
        MGEditConfig(granularity="rows", locations=neuron)
    module = neuron.coarsen("module")
    with pytest.raises(ValueError, match=r"needs located rows.*granularity='row'"):
        MGEditConfig(granularity="row", locations=module)
    with pytest.raises(ValueError, match="needs located neurons"):
        MGEditConfig(granularity="neuron", locations=neuron.coarsen("row"))
    with pytest.raises(ValueError, match="needs a key layer"):
        MGEditConfig(granularity="layer", locations=neuron.coarsen("full"))
    with pytest.raises(ValueError, match="needs located rows"):
        MGEditConfig(granularity="row", locations=module.to_dict())
    with pytest.raises(TypeError):
        MGEditConfig(granularity="row", locations=[1, 2])

    # a finer Locations (object or dict) is coarsened
    for g in ("full", "layer", "module", "row"):
        cfg = MGEditConfig(granularity=g, locations=neuron)
        assert cfg.locations.granularity == g
        assert MGEditConfig(granularity=g, locations=neuron.to_dict()).locations.granularity == g
    cfg = MGEditConfig(granularity="row", locations=neuron.to_dict())
    assert all(torch.equal(cfg.locations.rows[n], neuron.rows[n]) for n in neuron.rows)

    # the JSON form is compact: counts, no indices; and it reads back
    d = MGEditConfig(granularity="neuron", locations=neuron).to_dict()
    json.dumps(d)
    assert d["peft_type"] == "MG_EDIT" and "neurons" not in d["locations"]
    assert d["locations"]["num_neurons"] == {n: 10 for n in neuron.modules}
    back = MGEditConfig(**{k: v for k, v in d.items()})
    assert not back.has_indices and back.compact_locations()["num_neurons"] == d["locations"]["num_neurons"]
    assert MGEditConfig(granularity="row", locations=d["locations"]).compact_locations()["num_rows"] == {
        n: 4 for n in neuron.modules
    }

    # target_modules is derived; a conflicting one is refused before the model is touched
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(model, MGEditConfig(granularity="row", locations=neuron, target_modules=["fc_out"]))
    assert no_adapter_left(model)


# -- bad input: clear errors, nothing half-applied ---------------------------------------------------
def _save_adapter(family, granularity, path, **model_kw):
    base = make_model(family, **model_kw)
    locs = make_locations(base, family, granularity)
    pm = get_peft_model(base, MGEditConfig(granularity=granularity, locations=locs))
    randomise_deltas(pm)
    pm.save_pretrained(path)
    return locs


def test_adapter_for_another_base_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import make_config

    _save_adapter("codegen", "row", tmp_path)
    x = inputs()
    # shape mismatch: a wider model
    cfg = make_config("codegen", 600)
    cfg.n_embd, cfg.n_inner = 48, 96
    wider = AutoModelForCausalLM.from_config(cfg).eval()
    before = logits(wider, x)
    with pytest.raises(ValueError, match=r"does not fit.*made for \[32, 128\]"):
        PeftModel.from_pretrained(wider, tmp_path)
    assert no_adapter_left(wider)
    assert torch.equal(logits(wider, x), before)
    # module missing: a shallower model
    shallow = make_model("codegen", n_layers=1)
    with pytest.raises(ValueError, match=r"does not exist"):
        PeftModel.from_pretrained(shallow, tmp_path)
    assert no_adapter_left(shallow)
    # a different family
    llama = make_model("llama")
    with pytest.raises(ValueError, match="does not fit"):
        PeftModel.from_pretrained(llama, tmp_path)
    assert no_adapter_left(llama)
    # layer granularity: the key layer is beyond the model
    _save_adapter("codegen", "layer", tmp_path / "layer")
    with pytest.raises(ValueError, match="key layer 1 does not exist"):
        PeftModel.from_pretrained(shallow, tmp_path / "layer")
    assert no_adapter_left(shallow)


@pytest.mark.parametrize("granularity", ["row", "neuron"])
def test_corrupt_indices_in_file(granularity, tmp_path):
    locs = _save_adapter("gpt2", granularity, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(path)
    key = f"base_model.model.{locs.modules[0]}.mg_edit_index"
    cases = {"out of range": 10_000, "duplicate": None, "no .* indices": "drop", "shape": "shape"}
    x = inputs()
    for message, bad in cases.items():
        tensors = dict(good)
        if bad == "drop":
            del tensors[key]
        elif bad == "shape":
            tensors[key] = tensors[key][..., :-1].contiguous()
        elif bad is None:
            idx = tensors[key].clone()
            idx[..., 1] = idx[..., 0]
            tensors[key] = idx
        else:
            idx = tensors[key].clone()
            idx.view(-1)[-1] = bad
            tensors[key] = idx
        save_file(tensors, path)
        fresh = make_model("gpt2")
        before = logits(fresh, x)
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(fresh, tmp_path)
        assert no_adapter_left(fresh), message
        assert torch.equal(logits(fresh, x), before)
    # a wrongly sized delta
    tensors = dict(good)
    dkey = key.replace("mg_edit_index", "mg_edit_delta")
    tensors[dkey] = tensors[dkey][:-1].contiguous()
    save_file(tensors, path)
    fresh = make_model("gpt2")
    with pytest.raises(ValueError, match="delta of shape"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert no_adapter_left(fresh)

    # the same check on layers injected straight into a model (PEFT's low-level API)
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    raw = peft.inject_adapter_in_model(cfg, make_model("gpt2"))
    with pytest.raises(ValueError, match="out of range"):
        peft.set_peft_model_state_dict(raw, {k: torch.full_like(v, 10_000) if k == key else v for k, v in good.items()})
    assert no_adapter_left(raw)

    # a failed load_adapter on an existing PeftModel leaves its other adapter alone
    save_file(good, path)
    pm = PeftModel.from_pretrained(make_model("gpt2"), tmp_path, adapter_name="ok")
    expected = logits(pm, x)
    tensors = dict(good)
    tensors[key] = torch.full_like(good[key], 10_000)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="out of range"):
        pm.load_adapter(tmp_path, adapter_name="bad")
    assert list(pm.peft_config) == ["ok"]
    assert all(set(layer.mg_edit_kind) == {"ok"} for layer in mg_layers(pm).values())
    torch.testing.assert_close(logits(pm, x), expected, atol=0, rtol=0)


def test_invalid_in_memory_locations_touch_nothing():
    model = make_model("llama")
    locs = make_locations(model, "llama", "row")
    bad = Locations("row", modules=locs.modules, layer=LAYER, rows={locs.modules[0]: torch.tensor([0, 31, 32])})
    with pytest.raises(ValueError, match=r"out of range \[0, 32\)"):
        get_peft_model(model, MGEditConfig(granularity="row", locations=bad))
    assert no_adapter_left(model)
    bad = Locations("neuron", modules=locs.modules, layer=LAYER, rows=locs.rows,
                    neurons={locs.modules[1]: torch.tensor([[0, 1], [3, 64]])})
    with pytest.raises(ValueError, match=r"column indices out of range \[0, 64\)"):
        get_peft_model(model, MGEditConfig(granularity="neuron", locations=bad))
    assert no_adapter_left(model)
    missing = Locations("module", modules=["model.layers.1.mlp.nonexistent"], layer=1)
    with pytest.raises(ValueError, match="does not exist"):
        get_peft_model(model, MGEditConfig(granularity="module", locations=missing))
    assert no_adapter_left(model)


def test_quantized_base_model_refused_before_touching_it():
    model = make_model("codegen")
    locs = make_locations(model, "codegen", "row")
    target = model.get_submodule(locs.modules[1])
    target.weight = torch.nn.Parameter(torch.randint(-127, 127, target.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"quantized \(int8 / 4-bit\).*merged"):
        get_peft_model(model, MGEditConfig(granularity="row", locations=locs))
    assert no_adapter_left(model)
    assert not any(isinstance(m, MGEditLayer) for m in model.modules())


def test_compact_config_without_indices_cannot_run_unloaded(tmp_path):
    _save_adapter("codegen", "row", tmp_path)
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, MGEditConfig) and not cfg.has_indices
    pm = get_peft_model(make_model("codegen"), cfg)
    with pytest.raises(RuntimeError, match="indices were never loaded"):
        pm(inputs())


# -- locating inside get_peft_model ---------------------------------------------------------------
def test_missing_locations_need_a_tokenizer():
    model = make_model("codegen")
    with pytest.raises(ValueError, match=r"locations=mg_editing\.locate\.locate\(.*tokenizer_name_or_path="):
        get_peft_model(model, MGEditConfig(granularity="row"))
    assert no_adapter_left(model)
    with pytest.raises(ValueError, match=r"could not be loaded from .*/does/not/exist.*locations=mg_editing\.locate"):
        get_peft_model(model, MGEditConfig(granularity="row", tokenizer_name_or_path="/does/not/exist"))
    assert no_adapter_left(model)


def test_locating_phase_runs_in_get_peft_model(tmp_path, monkeypatch):
    import importlib

    import mg_editing.data

    locate_module = importlib.import_module("mg_editing.locate")  # the module, not the package-level function

    from conftest import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path / "tok")
    seen = {}
    real_load, real_locate = mg_editing.data.load_codegenbias, locate_module.locate

    def small_load(split, **kw):  # the real locating set, cut to 8 prompts to keep the test fast
        seen["split"] = split
        return real_load(split, **kw).select(range(8))

    def spy(model, tokenizer, dataset, granularity="row", **options):
        seen.update(granularity=granularity, n=len(dataset), options=options, tokenizer=type(tokenizer).__name__)
        return real_locate(model, tokenizer, dataset, granularity=granularity, **options)

    monkeypatch.setattr(mg_editing.data, "load_codegenbias", small_load)
    monkeypatch.setattr(locate_module, "locate", spy)
    model = make_model("codegen")
    cfg = MGEditConfig(granularity="row", tokenizer_name_or_path=str(tmp_path / "tok"), locate_options={"progress": False})
    pm = get_peft_model(model, cfg)
    assert seen["split"] == "train+dev" and seen["n"] == 8
    assert seen["granularity"] == "row" and seen["options"] == {"progress": False}
    assert isinstance(cfg.locations, Locations) and cfg.locations.granularity == "row" and cfg.locations.num_rows > 0
    in_features = {n: weight_out_in(pm.get_base_model().get_submodule(n).get_base_layer()).shape[1] for n in cfg.locations.rows}
    assert pm.get_nb_trainable_parameters()[0] == sum(len(r) * in_features[n] for n, r in cfg.locations.rows.items())
    pm.save_pretrained(tmp_path / "adapter")  # and the located indices are what gets saved
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for n, r in cfg.locations.rows.items():
        assert torch.equal(tensors[f"base_model.model.{n}.mg_edit_index"], r)


# -- registration -------------------------------------------------------------------------------------
def test_registration_in_peft_mapping():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert registration.is_registered()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MG_EDIT"] is MGEditConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MG_EDIT"] is MGEditModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["MG_EDIT"] == "mg_edit_" == MGEditModel.prefix
    registration.register()  # idempotent
    registration.register(MGEditConfig, MGEditModel)
    t = registration.MG_EDIT_PEFT_TYPE
    assert t == "MG_EDIT" and hash(t) == hash("MG_EDIT") and t.value == "MG_EDIT" and str(t) == "PeftType.MG_EDIT"
    assert json.dumps({"peft_type": t}) == '{"peft_type": "MG_EDIT"}'
    assert copy.deepcopy(t) == t and type(copy.deepcopy(t)) is type(t)
    pm = get_peft_model(make_model("gpt2"), MGEditConfig(granularity="row", locations=make_locations(make_model("gpt2"), "gpt2", "row")))
    assert peft.get_model_status(pm).available_adapters == ["default"]


def test_registration_collisions(monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    class Other(peft.PeftConfig):
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, "MG_EDIT", Other)
    with pytest.raises(KeyError, match="already a PEFT method called 'MG_EDIT'"):
        registration.register()
    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, "MG_EDIT", MGEditConfig)
    monkeypatch.setitem(PEFT_TYPE_TO_PREFIX_MAPPING, "SOMETHING_ELSE", "mg_edit_")
    with pytest.raises(KeyError, match="already a prefix called 'mg_edit_'"):
        registration.register()
    monkeypatch.delitem(PEFT_TYPE_TO_PREFIX_MAPPING, "SOMETHING_ELSE")

    class OtherModel(MGEditModel):
        prefix = "other_"

    with pytest.raises(ValueError, match="Inconsistent prefixes"):
        registration.register(MGEditConfig, OtherModel)
    # unregister / register round trip
    registration.unregister()
    assert "MG_EDIT" not in PEFT_TYPE_TO_TUNER_MAPPING
    registration.register()
    assert PEFT_TYPE_TO_TUNER_MAPPING["MG_EDIT"] is MGEditModel


def test_peft_version_pin(monkeypatch):
    assert registration.check_peft_version() == peft.__version__
    monkeypatch.setattr(peft, "__version__", "0.99.0")
    with pytest.warns(RuntimeWarning, match="tested with peft"):
        registration.check_peft_version()
    monkeypatch.setattr(peft, "__version__", "0.13.0")
    with pytest.raises(ImportError, match="pip install"):
        registration.check_peft_version()
    monkeypatch.setattr(peft, "__version__", "0.21.2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registration.check_peft_version()
