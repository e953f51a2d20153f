"""Files in and out: weights read safely and checked against the model (:mod:`.weights`), the authors'
release files (:mod:`.official`), our folders (:mod:`.folders`) and the released text-to-image folders
(:mod:`.t2i_folder`)."""

from bitdance.formats.folders import load_component, save_tokenizer_folder
from bitdance.formats.official import (
    load_head,
    load_official_generator,
    load_tokenizer,
    save_official_generator,
    save_official_tokenizer,
)
from bitdance.formats.t2i_folder import is_text_to_image_folder, load_folder, save_folder
from bitdance.formats.weights import CheckpointError, load_file, safetensors_shapes

__all__ = ["CheckpointError", "is_text_to_image_folder", "load_component", "load_file", "load_folder", "load_head",
           "load_official_generator", "load_tokenizer", "safetensors_shapes", "save_official_generator",
           "save_folder", "save_official_tokenizer", "save_tokenizer_folder"]
