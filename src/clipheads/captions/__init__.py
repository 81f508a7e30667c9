"""Caption generation from the (ablated) CLIP image encoder, for the layer-wise study.

    captioner = build_captioner(captions, embed_dim=backend.encode_image(pixels[:1]).shape[-1])
    train_captioner(captioner, encode_images(backend, pixels), captions)
    with clipheads.ablate(backend, clipheads.HeadMask.from_layers("3", backend)):
        generate_captions(captioner, backend, pixels, prefixes="a photo of a")
    LayerwiseCaptioning(captioner, backend, pixels)([[], [3]], selected)  # the layer-wise study's captions
"""

from clipheads.captions.captioners import Captioner, clip_scores, generate_captions, load_captioner
from clipheads.captions.encoder_decoder import VisionEncoderDecoderCaptioner, random_vision_encoder_decoder
from clipheads.captions.layerwise import GroupCaptions, LayerwiseCaptionConfig, LayerwiseCaptioning
from clipheads.captions.prefix import CaptionerConfig, PrefixCaptioner, build_captioner, caption_vocabulary
from clipheads.captions.training import CaptionTrainConfig, CaptionTrainResult, encode_images, train_captioner

__all__ = ["CaptionTrainConfig", "CaptionTrainResult", "Captioner", "CaptionerConfig", "GroupCaptions",
           "LayerwiseCaptionConfig", "LayerwiseCaptioning", "PrefixCaptioner", "VisionEncoderDecoderCaptioner",
           "build_captioner", "caption_vocabulary", "clip_scores", "encode_images", "generate_captions",
           "load_captioner", "random_vision_encoder_decoder", "train_captioner"]
