"""The bundled world: rendered scenes with captions and a planted spurious cue, and the small CLIP trained on them.

    from clipheads.world import make_world, WorldSizes
    paths = make_world("world", seed=0, sizes=WorldSizes(train=0))   # held-out splits only
    paths.retrieval, paths.selection["val_ood"], paths.counterfactual["cue"]

Training (``clipheads.world.train``) imports transformers and is not loaded here.
"""

from clipheads.world.evaluate import SplitResult, evaluate_world
from clipheads.world.grammar import vocabulary, world_tokenizer
from clipheads.world.make import HELD_OUT, SPLITS, WorldPaths, WorldSizes, generate_split, make_world, read_split
from clipheads.world.scene import CUE_SHAPE, MARKER_COLOURS, SHAPE_CUE, SHAPES, Scene, render_scene, sample_scene

__all__ = ["CUE_SHAPE", "HELD_OUT", "MARKER_COLOURS", "SHAPES", "SHAPE_CUE", "SPLITS", "Scene", "SplitResult",
           "WorldPaths", "WorldSizes", "evaluate_world", "generate_split", "make_world", "read_split",
           "render_scene", "sample_scene", "vocabulary", "world_tokenizer"]
