"""One HSDTrainer step on a tiny float64 model, launched by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/distributed_train.py OUT.pt ddp|fsdp2
    python tests/distributed_train.py OUT.pt single GA

Rank 0 saves {"loss", "params"} (full tensors) to OUT.pt. The data, model and seed are the same
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
    extra = {}
    if mode != "single":
        extra["ddp_backend"] = "gloo"
    if mode == "fsdp2":
        extra.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
