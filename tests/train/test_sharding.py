"""The train step on a device mesh (8 forced CPU devices, in a subprocess): the same losses and
trainable parameters on meshes (8,1), (4,2), (2,4) and (1,1) for LoRA, on (2,4) and (1,1) for
the other methods, and base bytes per device ∝ 1/fsdp."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jpeft.train.sharding import leaf_spec, make_mesh

ROOT = Path(__file__).resolve().parents[2]
MESHES = ["data=8,fsdp=1", "data=4,fsdp=2", "data=2,fsdp=4", "data=1,fsdp=1"]
TOLERANCE = 2e-5  # float32: the reduction order differs between meshes

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from tests.helpers import mesh_train_losses, tiny_batch, tiny_bert
    from jpeft.methods import build
    from jpeft.core import paths as P
    model, params = tiny_bert(hidden=32, heads=4)
    out = {}
    for spec in sys.argv[1].split(","):
        # every mesh for LoRA; for the other methods, data and fsdp both > 1 against one device
        for mesh_spec in (%r if spec == "lora" else ["data=2,fsdp=4", "data=1,fsdp=1"]):
            trainer, state, losses = mesh_train_losses(model, build(spec), params, mesh_spec, steps=3)
            frozen_bytes = sum(x.addressable_shards[0].data.nbytes for x in trainer.frozen.values())
            leaves = [np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(state.trainable)]
            out[f"{spec}|{mesh_spec}"] = {"losses": losses, "leaves": leaves,
                                          "frozen_bytes_per_device": frozen_bytes}
            if spec == "lora":  # the compiled step's argument bytes (one more compilation)
                batch = trainer.shard_batch(dict(tiny_batch(batch=8, seed=2)))
                compiled = trainer.train_step.lower(state, trainer.frozen, batch).compile()
                out[f"{spec}|{mesh_spec}"]["argument_bytes"] = compiled.memory_analysis().argument_size_in_bytes
    print("RESULT" + json.dumps(out))
""" % (MESHES,))


@pytest.fixture(scope="module")
def mesh_runs():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "lora,prompt,diff_pruning,lora+ia3+bitfit"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("spec", ["lora", "prompt", "diff_pruning", "lora+ia3+bitfit"])
def test_same_losses_and_parameters_on_every_mesh(mesh_runs, spec):
    ref = mesh_runs[f"{spec}|data=1,fsdp=1"]
    for mesh in (MESHES[:-1] if spec == "lora" else ["data=2,fsdp=4"]):
        run = mesh_runs[f"{spec}|{mesh}"]
        np.testing.assert_allclose(run["losses"], ref["losses"], atol=TOLERANCE, rtol=0)
        for a, b in zip(run["leaves"], ref["leaves"]):
            np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)


def test_base_bytes_per_device_fall_with_fsdp(mesh_runs):
    per_device = {m: mesh_runs[f"lora|{m}"]["frozen_bytes_per_device"] for m in MESHES}
    full = per_device["data=1,fsdp=1"]
    assert per_device["data=8,fsdp=1"] == full
    # everything at least min_shard_size is split; small leaves stay replicated
    assert per_device["data=4,fsdp=2"] < 0.6 * full
    assert per_device["data=2,fsdp=4"] < 0.6 * per_device["data=4,fsdp=2"]
    args = {m: mesh_runs[f"lora|{m}"]["argument_bytes"] for m in MESHES}
    assert args["data=2,fsdp=4"] < args["data=4,fsdp=2"] < args["data=8,fsdp=1"]


def test_mesh_spec_and_leaf_rule():
    import jax
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh("data=1,fsdp=1", jax.devices()[:1])
    assert mesh.shape == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh("data=2,fsdp=2", jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown"):
        make_mesh("model=2")

    class FakeMesh:
        shape = {"data": 2, "fsdp": 4}

    assert leaf_spec("a/kernel", (384, 1536), FakeMesh(), min_shard_size=1) == P(None, "fsdp")
    assert leaf_spec("a/kernel", (6, 10), FakeMesh(), min_shard_size=1) == P()
    assert leaf_spec("a/bias", (384,), FakeMesh()) == P()  # small: replicated
    assert leaf_spec("emb", (8, 8), FakeMesh(), rules=[("emb", P("fsdp", None))]) == P("fsdp", None)
