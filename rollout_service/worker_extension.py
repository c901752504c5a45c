"""gd2po's vLLM worker extension: in-place weight reloads that serve exactly the weights given, from a
folder or received over the trainer's process group (``trainer.publish.transport: broadcast``; protocol
in proto/weight_transfer.py).

vLLM mixes this class into its worker (``LLM(worker_extension_cls=...)``) and the engine calls its methods
through ``collective_rpc``, so they run where the model lives. Methods carry a ``gd2po_`` prefix: vLLM
refuses an extension whose names clash with the worker's own.

**Tied output layer.** vLLM's in-place reload (``reload_weights``) loads each layer from the tensors it is
given. A model with ``tie_word_embeddings`` (SmolLM2, Qwen2.5-0.5B…) has no ``lm_head.weight`` in its
checkpoint, so its output layer "fails to load" and vLLM puts its previous kernel tensors back — on CPU the
packed GEMM weights made from the *first* embeddings. The engine then sampled every later policy through
the starting policy's output layer: log-probs that were not the trainer's (a 0.1–0.5 nat error per token on
the tiny test model). After every reload the output layer is tied to the reloaded embeddings again and its
kernel rebuilt (:meth:`GD2POWorkerExtension._retie_output_layer`).

**Transfers.** A transfer group (gloo, or NCCL on GPUs; proto/weight_transfer.py) has the trainer as
rank 0 and every worker of the engine as rank 1 + its tensor-parallel rank
(``rollout.tensor_parallel_size``; one worker without it): each worker receives every bucket and its
in-place reload keeps its own shard of each tensor. The received buffers are checked
against the digest before anything is loaded, then handed to the same in-place reload with the trainer's
(Hugging Face) tensor names.
"""

from __future__ import annotations

from proto.weight_transfer import close, connect_store, open_group, read_meta, receive, unpack


class GD2POWorkerExtension:
    def gd2po_reload_folder(self, weights_path: str) -> None:
        """Reload the weights in place from a safetensors folder."""
        self.model_runner.reload_weights(weights_path=weights_path)
        self._retie_output_layer()

    def gd2po_receive_weights(self, host: str, port: int, nonce: str, timeout_s: float) -> dict:
        """Join transfer ``nonce`` at the trainer's store ``host:port`` over the group kind the trainer chose
        (gloo into host memory, NCCL into this worker's GPU), receive and verify every bucket, then reload
        the weights in place. Returns ``{"version", "digest", "bytes", "backend"}``. Raises
        :class:`proto.weight_transfer.WeightTransferError`; the weights are unchanged then."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        store = connect_store(host, port, timeout_s)
        meta = read_meta(store, nonce)
        device = self.device if meta.backend == "nccl" else None
        workers = get_tensor_model_parallel_world_size()
        rank = 1 + get_tensor_model_parallel_rank()
        group = open_group(store, nonce, rank, timeout_s, 1 + workers, meta.backend, device)
        try:
            buffers = receive(group, meta.buckets, meta.digest, timeout_s, device)
        finally:
            close(group)
        self.model_runner.reload_weights(weights_iterator=unpack(buffers, meta.buckets))
        self._retie_output_layer()
        nbytes = sum(b.numel() for b in buffers)
        return {"version": meta.version, "digest": meta.digest, "bytes": nbytes, "backend": meta.backend}

    def _retie_output_layer(self) -> None:
        """With tied word embeddings, point the output layer at the reloaded embeddings and rebuild its
        kernel (see the module docstring). A model without a tie, or with another layout, is left alone."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        config = self.model_runner.model_config.hf_text_config
        if not getattr(config, "tie_word_embeddings", False):
            return
        model = self.model_runner.get_model()
        heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
        embeddings = [
            m
            for m in model.modules()
            if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
        ]
        if len(heads) != 1 or len(embeddings) != 1:
            return
        head, embedding = heads[0], embeddings[0]
        head.weight = embedding.weight
        head.quant_method.process_weights_after_loading(head)
