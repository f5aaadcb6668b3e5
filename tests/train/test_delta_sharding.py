"""Delta leaves follow their kernels' sharding (8 forced CPU devices, in a subprocess): on an NNX
transformer jpeft did not write, whose weights are split over ``fsdp``, LoRA's ``A`` takes the
partition of its kernel's input axes and ``B`` that of its output axes, (IA)³'s vectors that of
their axis, LoHa's factors as LoRA's, LoKr's Kronecker factors replicated; the losses equal one
device's."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from flax import nnx
    import jpeft
    from jpeft.methods import LoraConfig, IA3Config, LohaConfig, LokrConfig, lora, ia3, loha, lokr
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer
    from jpeft.train.sharding import make_mesh
    from tests import own_models as M
    model, params = jpeft.from_nnx(M.NnxTransformer(nnx.Rngs(0)), head_patterns=("^head/",))
    ids = jax.random.randint(jax.random.key(1), (8, 5), 0, M.V)
    batch = {"input_ids": ids, "labels": jnp.arange(8) % 2, "weights": jnp.ones(8)}
    method = jpeft.compose(lora(LoraConfig(r=2, alpha=4.0, targets=r"(query|out)$")),
                           ia3(IA3Config(targets=r"(value|down)$", feedforward=r"down$")),
                           loha(LohaConfig(r=2, targets=r"key$")), lokr(LokrConfig(r=1, targets=r"up$")))
    out = {}
    for spec in ("data=2,fsdp=4", "data=1,fsdp=1"):
        devices = jax.devices()[:1] if spec == "data=1,fsdp=1" else None
        trainer = Trainer(model, method, params, optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
                          total_steps=3, model_inputs=("input_ids",),
                          mesh=make_mesh(spec, devices), min_shard_size=16)
        state = trainer.init_state(jax.random.key(0))
        losses = []
        for _ in range(3):
            state, metrics = trainer.train_step(state, trainer.frozen, trainer.shard_batch(batch))
            losses.append(float(metrics["loss"]))
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): x for path, x in
                jax.tree_util.tree_flatten_with_path(state.trainable["delta"])[0]}
        leaves = {k: {"spec": [str(a) for a in x.sharding.spec],
                      "bytes_per_device": x.addressable_shards[0].data.nbytes, "bytes": x.nbytes}
                  for k, x in flat.items()}
        kernels = {k: [str(a) for a in trainer.frozen[k].sharding.spec]
                   for k in ("layers/query/kernel", "layers/out/kernel", "layers/down/kernel",
                             "layers/key/kernel")}
        out[spec] = {"losses": losses, "leaves": leaves, "kernels": kernels}
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def runs():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_lora_factors_take_their_kernels_input_and_output_partitions(runs):
    mesh = runs["data=2,fsdp=4"]
    # the kernels: query (3, 16, 2, 8) split on its input axis, out (3, 2, 8, 16) on its output axis
    assert mesh["kernels"]["layers/query/kernel"] == ["None", "fsdp", "None", "None"]
    assert mesh["kernels"]["layers/out/kernel"] == ["None", "None", "None", "fsdp"]
    leaves = mesh["leaves"]
    a, b = leaves["lora/layers/query/lora_A"], leaves["lora/layers/query/lora_B"]
    assert a["spec"] == ["None", "fsdp", "None"] and a["bytes_per_device"] * 4 == a["bytes"]
    assert b["spec"] == [] or set(b["spec"]) == {"None"}
    assert b["bytes_per_device"] == b["bytes"]
    a, b = leaves["lora/layers/out/lora_A"], leaves["lora/layers/out/lora_B"]
    assert set(a["spec"]) <= {"None"} and a["bytes_per_device"] == a["bytes"]
    assert b["spec"] == ["None", "None", "fsdp"] and b["bytes_per_device"] * 4 == b["bytes"]
    print("per-device bytes:", {k: (v["bytes_per_device"], v["bytes"]) for k, v in leaves.items()})


def test_ia3_vectors_follow_their_axis_and_losses_match_one_device(runs):
    mesh, one = runs["data=2,fsdp=4"], runs["data=1,fsdp=1"]
    down = mesh["kernels"]["layers/down/kernel"]  # (3, 32, 16): split on the input axis (32)
    assert down == ["None", "fsdp", "None"]
    assert mesh["leaves"]["ia3/layers/down/ia3_l"]["spec"] == ["None", "fsdp"]  # input features
    for got, want in zip(mesh["losses"], one["losses"]):
        assert abs(got - want) <= 2e-5 * max(1.0, abs(want))
    assert one["losses"][-1] < one["losses"][0]


def test_loha_factors_follow_their_kernel_and_lokr_factors_are_replicated(runs):
    mesh = runs["data=2,fsdp=4"]
    assert mesh["kernels"]["layers/key/kernel"] == ["None", "fsdp", "None", "None"]
    leaves = mesh["leaves"]
    for i in (1, 2):
        u, v = leaves[f"loha/layers/key/w{i}_in"], leaves[f"loha/layers/key/w{i}_out"]
        assert u["spec"] == ["None", "fsdp", "None"] and u["bytes_per_device"] * 4 == u["bytes"]
        assert v["bytes_per_device"] == v["bytes"]
    kron = [v for k, v in leaves.items() if k.startswith("lokr/layers/up/")]
    assert kron and all(v["bytes_per_device"] == v["bytes"] for v in kron)
