"""Export of the runtime modules: ONNX files (:mod:`export.onnx_export`) and TensorRT engines
(:mod:`export.tensorrt`), both from the graphs in :mod:`export.graphs`.

    engine export onnx --weights DST --out DIR [--preset P] [--dtype fp32|fp16] [--batch N|dynamic]
                       [--flavour standard|tensorrt]
    engine export tensorrt --onnx DIR --out DIR [--fp16|--bf16]
"""
