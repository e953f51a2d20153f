"""diffusers-style pipelines: :class:`BitDancePipeline` (class-conditional) and :class:`BitDanceT2IPipeline`
(text-to-image), both thin subclasses of :class:`~bitdance.pipelines.base.Pipeline`."""

from bitdance.pipelines.base import OUTPUT_TYPES, Pipeline, PipelineOutput, SamplingOptions
from bitdance.pipelines.class_conditional import BitDancePipeline
from bitdance.pipelines.text_to_image import BitDanceT2IPipeline

__all__ = ["OUTPUT_TYPES", "BitDancePipeline", "BitDanceT2IPipeline", "Pipeline", "PipelineOutput", "SamplingOptions"]
