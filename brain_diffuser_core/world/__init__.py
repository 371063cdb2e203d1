"""MiniNSD: a small simulated Natural Scenes Dataset (procedural scenes + simulated observers).

``scenes`` draws captioned scenes with a scene graph; ``channels`` summarises what an observer sees of a
scene; ``observer`` simulates subjects 1, 2, 5 and 7 on a posterior patch of fsaverage5 with NSD-style ROIs and
known tuning; ``build`` writes the whole world as an NSD tree that :func:`brain_diffuser_core.nsd.load_subject`
reads (``build_world``, ``ensure_world``; CLI
``python -m brain_diffuser_core world build``). Import the submodules directly
(``from brain_diffuser_core.world.observer import Observer``); nilearn is only loaded when an observer is built.
"""
from .scenes import CATEGORIES, Scene, SceneObject, category_labels, generate_scene, generate_scenes, stack_images

__all__ = ["CATEGORIES", "Scene", "SceneObject", "category_labels", "generate_scene", "generate_scenes",
           "stack_images"]
