"""Qwen3 (QK-norm, explicit head_dim) and Qwen3-MoE: HF <-> Megatron conversion over TP x PP x EP x
expert-TP, the fused <-> per-expert HF layouts, Megatron-core logits parity with transformers (one rank
over gloo), and the weight path policy -> torch engine."""

import os

import megatron.core  # noqa: F401  a project dependency: fail, never skip, if it is missing
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from nemo_prorl.policy import hf_experts
from nemo_prorl.policy.megatron_convert import ModelShape, hf_to_megatron, megatron_to_hf, megatron_to_hf_lazy

VOCAB, SEQ = 100, 12
# head_dim 32 != hidden / heads (16): a model that used hidden / heads would have the wrong shapes
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
              rms_norm_eps=1e-6)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # random norms and router too, so a wrong layout of either cannot pass
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model.eval()


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return _perturb(Qwen3ForCausalLM(Qwen3Config(**COMMON)))


def tiny_qwen3_moe(seed: int = 0, norm_topk_prob: bool = True) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                         norm_topk_prob=norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    return _perturb(Qwen3MoeForCausalLM(cfg))


@pytest.fixture(scope="module")
def qwen3() -> Qwen3ForCausalLM:
    return tiny_qwen3()


@pytest.fixture(scope="module")
def qwen3_moe() -> Qwen3MoeForCausalLM:
    return tiny_qwen3_moe()


def test_shapes_from_config(qwen3, qwen3_moe):
    s = ModelShape.from_hf_config(qwen3.config)
    assert (s.head_dim, s.qk_norm, s.is_moe, s.qkv_bias) == (32, True, False, False)
    m = ModelShape.from_hf_config(qwen3_moe.config)
    assert (m.num_experts, m.moe_ffn_hidden_size, m.moe_topk, m.moe_norm_topk_prob, m.is_moe) == (4, 48, 2, True, True)


@pytest.mark.parametrize("field,value", [("decoder_sparse_step", 2), ("mlp_only_layers", [0])])
def test_unconvertible_moe_layouts_are_refused_naming_the_field(field, value):
    cfg = Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        ModelShape.from_hf_config(cfg)


def test_other_model_types_are_refused():
    from transformers import Qwen2MoeConfig

    with pytest.raises(ValueError, match="model_type='qwen2_moe'"):
        ModelShape.from_hf_config(Qwen2MoeConfig(num_hidden_layers=1))


def test_hf_experts_round_trip(qwen3_moe):
    sd = qwen3_moe.state_dict()
    canon = hf_experts.canonical_state_dict(sd)
    fused = sd["model.layers.1.mlp.experts.gate_up_proj"]
    # gate rows, then up rows (what transformers' forward chunks), as views of the fused parameter
    g, u = canon["model.layers.1.mlp.experts.3.gate_proj.weight"], canon["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert g.shape == u.shape == (48, 64) and g.data_ptr() == fused[3].data_ptr()
    assert torch.equal(torch.cat([g, u]), fused[3])
    assert torch.equal(canon["model.layers.0.mlp.experts.2.down_proj.weight"], sd["model.layers.0.mlp.experts.down_proj"][2])
    assert not any(hf_experts.is_fused(k) for k in canon)
    back = hf_experts.fuse_state_dict(canon)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # the names save_pretrained writes are the canonical ones
    assert hf_experts.resolve(sd, "model.layers.1.mlp.experts.3.up_proj.weight").data_ptr() == u.data_ptr()


def _check_round_trip(model, tp, pp, ep=1, etp=None):
    s = ModelShape.from_hf_config(model.config)
    sd = hf_experts.canonical_state_dict(model.state_dict())
    etp_ = tp if etp is None else etp
    shards = [[hf_to_megatron(sd, s, tp_rank=t, tp=tp, pp_rank=p, pp=pp, ep=ep, etp=etp,
                              etp_rank=(None if etp is None else 0)) for t in range(tp)] for p in range(pp)]
    experts = None
    if s.is_moe and (ep != 1 or etp_ != tp):
        experts = [[[hf_to_megatron(sd, s, tp_rank=0, tp=tp, pp_rank=p, pp=pp, ep_rank=e, ep=ep, etp_rank=r, etp=etp_)
                     for r in range(etp_)] for e in range(ep)] for p in range(pp)]
    back = megatron_to_hf(shards, s, experts)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    return shards, experts


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_qwen3_round_trip_is_exact(qwen3, tp, pp):
    shards, _ = _check_round_trip(qwen3, tp, pp)
    assert shards[0][0]["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (32,)
    # a TP shard holds its half of the query groups at head_dim 32: (4 q + 2 k + 2 v heads) * 32 / 2
    assert shards[0][-1]["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 32 // tp, 64)


@pytest.mark.parametrize("tp,pp,ep,etp", [(1, 1, 1, None), (2, 1, 1, None), (1, 2, 2, 1), (2, 2, 2, 2),
                                          (2, 1, 2, 1), (1, 1, 1, 2), (2, 1, 1, 1)])
def test_qwen3_moe_round_trip_is_exact(qwen3_moe, tp, pp, ep, etp):
    shards, experts = _check_round_trip(qwen3_moe, tp, pp, ep, etp)
    etp_ = tp if etp is None else etp
    sd = qwen3_moe.state_dict()
    # EP rank 1 holds whole experts 2 and 3 (local 0, 1); expert-TP splits each one's FFN
    holder = experts[0][ep - 1][etp_ - 1] if experts else shards[0][tp - 1]
    fc1 = holder["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]
    fc2 = holder["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"]
    assert fc1.shape == (2 * 48 // etp_, 64) and fc2.shape == (64, 48 // etp_)
    e, r = (ep - 1) * (4 // ep), etp_ - 1
    gate_up = sd["model.layers.0.mlp.experts.gate_up_proj"][e]
    assert torch.equal(fc1[: 48 // etp_], gate_up[:48].chunk(etp_)[r])
    assert torch.equal(fc2, sd["model.layers.0.mlp.experts.down_proj"][e].chunk(etp_, dim=1)[r])
    assert f"decoder.layers.0.mlp.experts.local_experts.{4 // ep}.linear_fc1.weight" not in holder


def test_hf_to_megatron_reads_fused_and_per_expert_names_alike(qwen3_moe):
    s = ModelShape.from_hf_config(qwen3_moe.config)
    sd = qwen3_moe.state_dict()
    a = hf_to_megatron(sd, s, tp_rank=1, tp=2, ep_rank=1, ep=2, etp_rank=1, etp=2)
    b = hf_to_megatron(hf_experts.canonical_state_dict(sd), s, tp_rank=1, tp=2, ep_rank=1, ep=2, etp_rank=1, etp=2)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lazy_stream_names_are_the_checkpoint_names(qwen3_moe, tmp_path):
    s = ModelShape.from_hf_config(qwen3_moe.config)
    qwen3_moe.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        on_disk = set(f.keys())
    shards = [[hf_to_megatron(qwen3_moe.state_dict(), s)]]
    assert {w.name for w in megatron_to_hf_lazy(shards, s)} == on_disk


# ---------------------------------------------------------------- Megatron-core vs transformers (one rank)

def _megatron_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_prorl.policy.parallel import build_gpt, init_model_parallel, vocab_parallel_logprobs

    init_model_parallel(1, 1, seed=0)
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    pos = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).view(1, 1, SEQ, SEQ)  # True = masked
    labels = ids.roll(-1, dims=1)
    results = {}
    for name, hf in (("qwen3", tiny_qwen3()), ("qwen3_moe", tiny_qwen3_moe()),
                     ("qwen3_moe_unnormed", tiny_qwen3_moe(norm_topk_prob=False))):
        model = build_gpt(hf.config, tp=1, pp=1, moe_token_dispatcher_type="alltoall")
        shard = hf_to_megatron(hf.state_dict(), ModelShape.from_hf_config(hf.config))
        missing, unexpected = model.load_state_dict(shard, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        model.eval()
        got = {}

        def loss_fn(output, got=got):
            got["logits"] = output[..., :VOCAB].clone()
            got["logp"] = vocab_parallel_logprobs(output, labels, VOCAB)
            return got["logp"].sum() * 0, {}

        def forward_step(data, m):
            return m(ids, pos, attention_mask=mask), loss_fn

        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                        num_microbatches=1, seq_length=SEQ, micro_batch_size=2, forward_only=True)
            got["ref_logits"] = hf(ids).logits.float()
        results[name] = got
    results["ids"] = ids
    torch.save(results, os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def megatron_results(tmp_path_factory):
    import torch.multiprocessing as mp

    from tests.test_megatron import _free_port

    out = tmp_path_factory.mktemp("megatron_qwen3")
    mp.spawn(_megatron_worker, args=(_free_port(), str(out)), nprocs=1, join=True)
    return torch.load(out / "result.pt")


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "qwen3_moe_unnormed"])
def test_megatron_logits_and_logprobs_match_transformers(megatron_results, name):
    got, ids = megatron_results[name], megatron_results["ids"]
    ref = got["ref_logits"]
    ref_logp = torch.log_softmax(ref, dim=-1).gather(-1, ids.roll(-1, dims=1).unsqueeze(-1)).squeeze(-1)
    # float32 on CPU; the two implementations sum in different orders
    torch.testing.assert_close(got["logits"], ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["logp"], ref_logp, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- prorl convert, both directions

@pytest.fixture(scope="module")
def saved(tmp_path_factory, qwen3, qwen3_moe):
    root = tmp_path_factory.mktemp("hf")
    for name, model in (("qwen3", qwen3), ("qwen3_moe", qwen3_moe)):
        model.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("name,tp,pp,ep,etp", [("qwen3", 2, 2, 1, None), ("qwen3_moe", 2, 1, 2, None),
                                               ("qwen3_moe", 2, 2, 2, 1), ("qwen3_moe", 1, 1, 1, 2)])
def test_prorl_convert_round_trip_is_exact(saved, tmp_path, name, tp, pp, ep, etp):
    import argparse

    from safetensors.torch import load_file

    from nemo_prorl.policy import convert

    parser = argparse.ArgumentParser()
    convert.add_parser(parser.add_subparsers(dest="command"))
    flags = ["--tp", str(tp), "--pp", str(pp), "--ep", str(ep)] + (["--etp", str(etp)] if etp else [])
    assert convert.run(parser.parse_args(["convert", "hf-to-megatron", str(saved / name), str(tmp_path / "meg"), *flags])) == 0
    assert convert.run(parser.parse_args(["convert", "megatron-to-hf", str(tmp_path / "meg"), str(tmp_path / "back")])) == 0
    if ep > 1 and etp is None:  # Megatron-LM's legacy names with expert parallelism
        assert (tmp_path / "meg/release" / ("mp_rank_01" + ("_001" if pp > 1 else "") + "_001")).is_dir()
    ref, back = load_file(saved / name / "model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


def test_prorl_convert_refuses_experts_for_a_dense_model(saved, tmp_path):
    from nemo_prorl.policy.convert import hf_to_megatron_dir

    with pytest.raises(ValueError, match="--ep 2"):
        hf_to_megatron_dir(saved / "qwen3", tmp_path / "meg", tp=1, pp=1, ep=2)


# ---------------------------------------------------------------- policy -> torch engine, per-expert names

def test_hf_policy_weights_load_into_the_torch_engine_exactly(saved, tmp_path):
    from nemo_prorl.config import load_config
    from nemo_prorl.policy.hf import HFPolicy
    from nemo_prorl.rollout.torch_engine import TorchRolloutEngine
    from tests.conftest import TINY_OVERRIDES

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={saved / 'qwen3_moe'}", "model.dtype=float32"])
    policy = HFPolicy(cfg, saved / "qwen3_moe", use_reference=False)
    tiny_qwen3_moe(seed=1).save_pretrained(tmp_path / "other")  # the engine starts from other weights
    engine = TorchRolloutEngine(tmp_path / "other", device="cpu", dtype="float32", max_num_seqs=2, pad_token_id=0)
    weights = dict(policy.named_weights())
    fused = policy.model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"]
    assert not any(hf_experts.is_fused(k) for k in weights)
    assert weights["model.layers.0.mlp.experts.1.gate_proj.weight"].data_ptr() == fused[1].data_ptr()  # a view
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = engine.model(ids).logits
        engine.load_weights(policy.named_weights())
        got, want = engine.model(ids).logits, policy.model(ids).logits
    ref = policy.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in engine.model.state_dict().items())
    assert torch.equal(got, want) and not torch.equal(before, want)
    with pytest.raises(KeyError, match="experts.9"):  # an expert the model does not have is no slice of it
        engine.load_weights([("model.layers.0.mlp.experts.9.up_proj.weight", torch.zeros(48, 64))])


# ---------------------------------------------------------------- the demo's tiny models

def test_demo_builds_tiny_qwen3_and_qwen3_moe():
    from nemo_prorl.config.schema import TinyModelConfig
    from nemo_prorl.demo.tiny import build_tiny_model, build_tiny_qwen2, train_tokenizer

    tok = train_tokenizer(["user\nassistant\n", "12 + 34 = 46\n"] * 4, 300)
    small = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    q2 = build_tiny_model(TinyModelConfig(**small), tok, seed=5)  # the default: exactly today's model
    ref = build_tiny_qwen2(TinyModelConfig(**small), tok, seed=5)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in q2.state_dict().items())
    for arch in ("qwen3", "qwen3_moe"):
        model = build_tiny_model(TinyModelConfig(**small, architecture=arch, num_experts=4), tok, seed=5)
        s = ModelShape.from_hf_config(model.config)
        assert model.config.model_type == arch and s.qk_norm and s.head_dim == 32  # vLLM-CPU needs >= 32
        assert s.vocab_size == len(tok) and s.is_moe == (arch == "qwen3_moe")
        assert arch == "qwen3" or (s.num_experts, s.moe_topk, s.moe_norm_topk_prob) == (4, 2, True)
    with pytest.raises(ValueError, match="model.tiny.architecture"):
        build_tiny_model(TinyModelConfig(architecture="mixtral"), tok, seed=5)


# ---------------------------------------------------------------- Transformer Engine's names (GPU path)

def test_transformer_engine_names_round_trip(qwen3_moe, qwen3):
    from nemo_prorl.policy.megatron_convert import from_te_names, to_te_names

    moe = hf_to_megatron(qwen3_moe.state_dict(), ModelShape.from_hf_config(qwen3_moe.config), ep_rank=1, ep=2)
    te = to_te_names(moe, grouped_experts=True)
    # TEGroupedMLP's parameters; the MoE layer keeps its own pre-MLP norm (TENorm), the input norm is fused
    local = moe["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"]
    assert te["decoder.layers.1.mlp.experts.linear_fc1.weight1"] is local
    assert {"decoder.layers.0.mlp.experts.linear_fc2.weight0", "decoder.layers.0.pre_mlp_layernorm.weight",
            "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"} <= set(te)
    assert not any("local_experts" in k or k.endswith("input_layernorm.weight") for k in te)
    assert from_te_names(te) == moe
    sequential = to_te_names(moe, grouped_experts=False)  # TE linears one expert at a time: local names
    assert "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight" in sequential
    dense = hf_to_megatron(qwen3.state_dict(), ModelShape.from_hf_config(qwen3.config))
    te_dense = to_te_names(dense, grouped_experts=True)
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te_dense
    assert "decoder.layers.1.pre_mlp_layernorm.weight" not in te_dense
    assert from_te_names(te_dense) == dense


def test_transformer_config_from_policy_megatron(qwen3, qwen3_moe):
    from nemo_prorl.config.schema import MegatronConfig
    from nemo_prorl.policy.parallel import megatron_options, transformer_config

    opts = megatron_options(MegatronConfig(moe_aux_loss_coeff=0.01, moe_token_dispatcher_type="allgather"))
    c = transformer_config(qwen3_moe.config, tp=1, pp=1, **{**opts, "moe_enable_routing_replay": True})
    assert (c.num_moe_experts, c.moe_ffn_hidden_size, c.moe_router_topk, c.moe_router_pre_softmax) == (4, 48, 2, False)
    assert (c.qk_layernorm, c.kv_channels, c.moe_aux_loss_coeff) == (True, 32, 0.01)
    assert c.moe_token_dispatcher_type == "allgather"
    assert c.moe_enable_routing_replay
    d = transformer_config(qwen3.config, tp=1, pp=1, **opts)  # a dense model takes none of the MoE options
    assert d.num_moe_experts is None and d.qk_layernorm and d.kv_channels == 32
    with pytest.raises(ValueError, match="policy.megatron.expert_parallel_size=2"):
        transformer_config(qwen3.config, tp=1, pp=1, **megatron_options(MegatronConfig(expert_parallel_size=2)))
    with pytest.raises(ValueError, match="moe_token_dispatcher_type=allgather"):
        transformer_config(qwen3_moe.config, tp=1, pp=2, **megatron_options(
            MegatronConfig(pipeline_parallel_size=2, moe_token_dispatcher_type="allgather")))
