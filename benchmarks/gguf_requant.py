"""A GGUF of the embedded model in another llama.cpp type, for benchmarks: every Q4_1 tensor of the
embedded GGUF dequantized and quantized again (e.g. Q8_0) with gguf-py, the metadata copied.

    python benchmarks/gguf_requant.py OUT.gguf [--type Q8_0]

The embedded model's weights are 4-bit values in blocks of 32, so a Q8_0 copy computes nearly the
same model (within Q8_0's rounding of them) while reading about 1.7x the bytes: llama.cpp's Q8_0
speed on the same model, next to prefloop's int8 (engine_throughput.py --llama-cpp-q8).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def requantize(src: Path, dst: Path, qtype_name: str = "Q8_0") -> Path:
    import gguf
    from gguf import quants
    qtype = gguf.GGMLQuantizationType[qtype_name]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            values = quants.dequantize(t.data, t.tensor_type)  # float32, the tensor's logical shape
            writer.add_tensor(t.name, quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the GGUF file to write")
    ap.add_argument("--type", default="Q8_0", help="llama.cpp tensor type for the Q4_1 tensors (default %(default)s)")
    args = ap.parse_args()
    from prefloop.server.model.default_model import default_gguf_path
    print(f"gguf_requant: {default_gguf_path().name} -> {args.out} ({args.type})", flush=True)
    requantize(default_gguf_path(), Path(args.out), args.type)
    print(f"gguf_requant: wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
