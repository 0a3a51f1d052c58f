"""The one path from trainer weights into rollout engines, used after every policy update.

Weights travel as full tensors under Hugging Face names, in size-bounded buckets, built directly in a
transfer buffer that the engines map (shared memory on CPU, CUDA IPC on GPU): each byte is copied once on
the sending side, and the peak extra memory is one bucket, whatever the model size. Engines that shard
again (vLLM TP) do so in their own `load_weights`, from these full tensors.

Data flows one way, policy -> sync -> engines; the modules, from the bottom up:
- buffer.py: the wire format (buckets, packing, the transfer buffer), which every side speaks;
- sender.py: the side that fills a node's buffer in the node-local sync (a Megatron rank's
  NodeLocalSender, the WeightRelay of a node without ranks);
- sync.py: the protocol, driven from the controller (`sync_weights`, `load_into_engine`, the node-local
  plan and steps, the clean-up after a failure). The policy and the engine pool only say what they hold.

This package's face is sync.py's entry points, re-exported here; sync.py imports neither the policy nor
the rollout package, so that both may import the weight sync.
"""

from nemo_prorl.weight_sync.sync import SyncStats, load_into_engine, sync_weights

__all__ = ["SyncStats", "load_into_engine", "sync_weights"]
