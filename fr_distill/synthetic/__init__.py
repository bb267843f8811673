"""Synthetic face data set: deterministic, learnable face-like images in the real file formats.

``generate(out_dir, num_identities, images_per_identity, seed, ...)`` writes::

    out_dir/
      train/<identity>/<k>.jpg      N identities × K aligned 112×112 JPEGs (quality 90);
                                    folders zero-padded (00000, 00001, …) so sorted order
                                    is the label order
      train.rec, train.idx          the same images, InsightFace RecordIO layout (header
                                    record, images ids 1..N·K, per-identity range records)
      synth_lfw.bin                 verification sets in InsightFace's format: a pickle of
      synth_cfp.bin                 (bins: list of JPEG bytes, issame_list: list of bool);
                                    pair k = bins[2k], bins[2k+1], alternating same/different;
                                    lfw: frontal pairs; cfp: frontal vs. strongly turned
                                    (CFP-FP-like), more occlusion, half of the negatives
                                    family-mates
      ijb/<NAME>/loose_crop/<i>.jpg loose crops of 150–200 px with the face at a random
                                    rotation (±30°), scale and offset
      ijb/<NAME>/meta/<name>_face_tid_mid.txt       img tid mid
                      <name>_template_pair_label.txt t1 t2 label
                      <name>_name_5pts_score.txt    img x1 y1 … x5 y5 faceness
                      <name>_1N_gallery_G1.csv, <name>_1N_gallery_G2.csv,
                      <name>_1N_probe_mixed.csv     IJB-C 1:N protocol columns TEMPLATE_ID,
                                    SUBJECT_ID, FILENAME, SIGHTING_ID (= media id), FACE_X,
                                    FACE_Y, FACE_WIDTH, FACE_HEIGHT; one row per image
                      <name>_align_truth.txt        img + the exact 2×3 loose → aligned map
      tinyface/Testing_Set/         TinyFace-style release (:mod:`.tinyface`): low-resolution
                                    faces (16–32 px high, about 4:5) of a fourth pool of
                                    identities; Gallery_Match/<id>_<n>.jpg, Probe/<id>_<n>.jpg,
                                    Gallery_Distractor/<k>.jpg, gallery_match_img_ID_pairs.mat
                                    and probe_img_ID_pairs.mat
      manifest.json                 parameters, counts, file sizes

What the images hold (:mod:`.faces`): each identity is a parametric face — face ellipse and
chin, skin tone, eye/brow/nose/mouth geometry, iris colour, hair, beard, ears, moles and a
skin texture of oriented cosines. Identities come in families of ``family_size`` sharing
most parameters (hard negatives: family ``f`` is identities ``f·family_size …`` of a pool).
Each image varies in-plane rotation (±8°), scale (±6 %), shift (±3 px), yaw (features
shift sideways by depth, far eye narrows), expression, background, light gradient,
brightness, blur, noise and occlusion (sunglasses, lower-face mask, random patch). Within
the aligned frame the five landmarks sit at their least-squares fit onto the ArcFace
template, so alignment by the listed IJB landmarks recovers the rendering exactly.

Training, verification, IJB and TinyFace identities are separate pools: disjoint. Every byte is a
function of the arguments (not of ``workers``); a second call with the same arguments
reuses the files (decided by ``manifest.json``). Speed, measured on a 2-core x86_64 VM:
about 1.9 ms of CPU per 112×112 training image (render + JPEG); 1,000 identities × 20
images plus the default .bin (2 × 600 pairs) and IJB (474 crops) sets take about 50 s of
CPU in all (``tools/make_synthetic.py``, start-up included), spread over the worker
processes (default: one per core), so about 25–30 s of wall time when both cores are free;
reusing an existing set takes under 2 s. The default TinyFace-style release (140 images) adds
about 0.5 s of CPU (``plan_tinyface`` + ``write_tinyface``, one worker, same VM).

Teachers in the model zoo's ONNX forms: ``write_onnx_teachers(model, out_dir)``
(:mod:`.onnx_teachers`; ``tools/make_synthetic.py --onnx-teachers MODEL``) writes a trained
model as ``teacher_normalized.onnx`` (input ``(pixels - 127.5) / 127.5``) and
``teacher_raw_pixels.onnx`` (a graph that normalizes raw 0–255 pixels itself), each verified
to be read with its convention and to reproduce the model's embeddings.
"""
from __future__ import annotations

from .build import generate
from .onnx_teachers import write_onnx_teachers

__all__ = ["generate", "write_onnx_teachers"]
