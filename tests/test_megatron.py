"""Megatron-core on CPU over gloo: HF <-> Megatron conversion of a tiny Qwen2, and logits parity with
transformers for TP=1, TP=2 and PP=2 (real megatron-core, 1-2 processes each)."""

import os
import socket

import megatron.core  # noqa: F401  a project dependency: fail, never skip, if it is missing
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nemo_prorl.policy.megatron_convert import ModelShape, hf_to_megatron, megatron_to_hf

VOCAB, SEQ = 100, 12


def tiny_hf(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                      rms_norm_eps=1e-6)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases too, so a wrong q/k/v bias layout cannot pass
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_conversion_round_trip_is_exact(tp, pp):
    hf = tiny_hf()
    sd = hf.state_dict()
    s = ModelShape.from_hf_config(hf.config)
    shards = [[hf_to_megatron(sd, s, tp_rank=t, tp=tp, pp_rank=p, pp=pp) for t in range(tp)] for p in range(pp)]
    back = megatron_to_hf(shards, s)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # a TP shard really is a slice: each rank holds its half of the query groups
    if tp == 2:
        assert shards[0][0]["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0] == (4 + 2 * 2) * 16 // 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, tp: int, pp: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_prorl.policy.parallel import build_gpt, init_model_parallel, vocab_parallel_logprobs

    init_model_parallel(tp, pp, seed=0)
    hf = tiny_hf()
    s = ModelShape.from_hf_config(hf.config)
    model = build_gpt(hf.config, tp=tp, pp=pp)
    shard = hf_to_megatron(hf.state_dict(), s, tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp=tp,
                           pp_rank=parallel_state.get_pipeline_model_parallel_rank(), pp=pp)
    missing, unexpected = model.load_state_dict(shard, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model.eval()
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    pos = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).view(1, 1, SEQ, SEQ)  # True = masked
    labels = ids.roll(-1, dims=1)
    result = {}

    def loss_fn(output):  # vocab-parallel: full logits are never gathered for the logprobs
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output)[..., :VOCAB].clone()
        # (megatron's vocab-parallel cross entropy works in place on the logits it is given)
        logp = vocab_parallel_logprobs(output, labels, VOCAB)
        result.update(logp=logp, logits=full, ids=ids)
        return logp.sum() * 0, {}

    def forward_step(data, m):
        return m(ids, pos, attention_mask=mask), loss_fn

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=SEQ, micro_batch_size=2, forward_only=True)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        with torch.no_grad():  # transformers on the very same weights
            result["ref_logits"] = hf(ids).logits.float()
        torch.save(result, os.path.join(out_dir, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_megatron_logits_and_logprobs_match_transformers(tp, pp, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(tp * pp, tp, pp, _free_port(), str(tmp_path)), nprocs=tp * pp, join=True)
    got = torch.load(tmp_path / "result.pt")
    ids, ref = got["ids"], got["ref_logits"]
    ref_logp = torch.log_softmax(ref, dim=-1).gather(-1, ids.roll(-1, dims=1).unsqueeze(-1)).squeeze(-1)
    # float32 on CPU; the two implementations sum in different orders
    torch.testing.assert_close(got["logits"], ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["logp"], ref_logp, atol=2e-5, rtol=1e-5)


def test_vocab_parallel_entropy_gradient_is_autograds():
    from nemo_prorl.algo.loss import entropy_from_logits
    from nemo_prorl.policy.parallel import vocab_parallel_entropy

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_entropy(x, group=None), (logits,))
    # against autograd through the plain formula, float32
    x = logits.detach().float().requires_grad_()
    w = torch.randn(2, 3, generator=g)
    (ours,) = torch.autograd.grad((vocab_parallel_entropy(x, group=None) * w).sum(), x)
    (ref,) = torch.autograd.grad((entropy_from_logits(x) * w).sum(), x)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # vocabulary padding (-inf) neither changes the entropy nor gets a gradient
    padded = torch.cat([x.detach(), torch.full((2, 3, 2), float("-inf"))], -1).requires_grad_()
    h = vocab_parallel_entropy(padded, group=None)
    torch.testing.assert_close(h, entropy_from_logits(x.detach()), atol=1e-6, rtol=0)
    (gp,) = torch.autograd.grad((h * w).sum(), padded)
    assert torch.isfinite(gp).all() and torch.equal(gp[..., 7:], torch.zeros(2, 3, 2))
    torch.testing.assert_close(gp[..., :7], ref, atol=1e-6, rtol=0)
    with torch.no_grad():  # the metric-only path builds no graph
        assert vocab_parallel_entropy(x, group=None).grad_fn is None
