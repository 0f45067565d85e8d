"""What the bot runs: face detection, alignment and expression classification, nothing else.

    from models.runtime.analyse import build_analyse
    analyse = build_analyse(settings.model, threads=settings.bot.inference_threads,
                            min_score=settings.bot.min_face_score)
    faces = analyse(frames)      # core.faces.Faces: each frame's largest face, with probs

These modules need only numpy, OpenCV and the TFLite interpreter (LiteRT), so that `pip install .`
(no TensorFlow, Keras or onnxruntime) is enough to run a bot. The weights are `models/weights/`.
Training, export, evaluation and benchmarks (`python -m models.train|export|evaluate|bench|...`) are the
other modules of `models/`: they may import this package, never the other way round.
"""
