"""The fast exit-aware decoding engine: the model's own blocks, a static KV cache, masks we build, CUDA graphs.

:class:`Engine` has three modes, one module each:

- all exits in one pass (:meth:`Engine.generate`, :mod:`earlyexit.engine.core`, with the programs and graphs);
- dynamic exits (:meth:`Engine.generate_dynamic`, CALM, :mod:`earlyexit.engine.dynamic`);
- self-speculative decoding (:meth:`Engine.generate_speculative`, LayerSkip, :mod:`earlyexit.engine.speculative`);

over the cache and masks of :mod:`earlyexit.engine.cache`. Every mode takes its options as one
:class:`earlyexit.generation.GenerationArgs` (keyword changes accepted).
"""

from earlyexit.engine.cache import StaticKV, additive_mask
from earlyexit.engine.core import Core, Stops
from earlyexit.engine.dynamic import DynamicExits, DynamicGeneration, confidence
from earlyexit.engine.speculative import SelfSpeculation, SpeculativeGeneration


class Engine(DynamicExits, SelfSpeculation):
    """Decode an :class:`~earlyexit.model.EarlyExitHead` fast: all exits in one pass, dynamic exits, self-speculation.

    Args:
        ee: the exit-aware model (eval mode; merge LoRA adapters first for speed).
        cuda_graphs: capture each decode step (or speculative cycle) as a CUDA graph; default: on when the model
            is on a GPU.
        compile: run the decode step's blocks and head through ``torch.compile`` (fuses the norms, rotary and
            element-wise work between the matmuls; compiles once per exit set and batch shape).
        compile_mode: how (:attr:`earlyexit.generation.GenerationArgs.compile_mode`).
        fast: run llama-style blocks on the fast path (:mod:`earlyexit.engine.fast`: fused projections, SDPA on the
            static cache; merges LoRA adapters); None: whenever the family has one, False: the model's own blocks.
    """


__all__ = ["Core", "DynamicGeneration", "Engine", "SpeculativeGeneration", "StaticKV", "Stops", "additive_mask",
           "confidence"]
