"""One HSDTrainer step on a tiny float64 model, launched by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/distributed_train.py OUT.pt ddp      # HSDTrainer (accelerate DDP)
    torchrun --nproc_per_node 2 tests/distributed_train.py OUT.pt fsdp2    # custom loop, fully_shard
    python tests/distributed_train.py OUT.pt single GA                     # HSDTrainer, GA micro-batches

accelerate runs FSDP only on accelerators (not MULTI_CPU), so on CPU the FSDP2 run is a custom
loop: torch's ``fully_shard`` over a gloo mesh and :func:`hsd.trainer.step_through`, with the
normalisation the Trainer uses. Rank 0 saves {"loss", "params"} (full tensors) to OUT.pt. The data, model and seed are the same
in every mode, so 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the same global batch.
"""

import os
import sys

import torch
import transformers

from hsd.data.testing import synthetic_wildchat_rows, tiny_chat_tokenizer
from hsd.trainer import HSDConfig, HSDTrainer


def main(out: str, mode: str, ga: int = 1) -> None:
    tok = tiny_chat_tokenizer("chatml")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.float64)
    rows = synthetic_wildchat_rows(8, seed=4, min_turns=2, max_turns=4, words=(2, 8))
    if mode == "fsdp2":
        return fsdp2_step(out, model, tok, rows)
    extra = {"ddp_backend": "gloo"} if mode == "ddp" else {}
    args = HSDConfig(output_dir=os.path.dirname(out), report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                     logging_steps=1, save_strategy="no", optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                     lr_scheduler_type="constant", max_steps=1, per_device_train_batch_size=2,
                     gradient_accumulation_steps=ga, dataloader_num_workers=0, **extra)
    trainer = HSDTrainer(model, args, train_dataset=rows, processing_class=tok)
    trainer.train()
    # every rank takes part in gathering sharded parameters
    params = {}
    for name, p in trainer.accelerator.unwrap_model(trainer.model_wrapped).named_parameters():
        p = p.detach()
        params[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    if trainer.is_world_process_zero():
        loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
        torch.save({"loss": loss, "params": params, "world_size": args.world_size}, out)


def fsdp2_step(out, model, tok, rows) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hsd.data import HindsightCollator
    from hsd.trainer import TokenBudgetBatchSampler, build_examples, step_through

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    args = HSDConfig(output_dir=os.path.dirname(out), report_to=[], use_cpu=True, seed=0)
    examples = build_examples(rows, tok, args)
    # the batches the Trainer's sampler gives (seed 0, epoch 0): rank r takes the r-th
    batches = list(TokenBudgetBatchSampler(examples.lengths, max_batch_size=2, seed=0))[:world]
    batch = HindsightCollator.from_tokenizer(tok)([examples[i] for i in batches[rank]])
    local = torch.tensor([float(batch["scored_tuple_index"].unique().numel())], dtype=torch.float64)
    total = local.clone()
    dist.all_reduce(total)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    step, loss = step_through(model, batch, None, module=model, reduction="seq_mean")
    # FSDP averages gradients over ranks: scale each rank's share of the global mean by world
    (loss * (local / total).to(loss.dtype) * world).backward()
    optimizer.step()
    logged = (step.loss.detach() * local / total).to(torch.float64)
    dist.all_reduce(logged)
    params = {name: p.detach().full_tensor().clone() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": float(logged), "params": params, "world_size": world}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
