"""`python -m fastllm`: what this installation was built with and which GPUs it can see."""

import torch

import fastllm


def main() -> None:
    info = fastllm.build_info()
    print(f"fastllm {info['version']}")
    print(f"  built against torch {info['torch']} (running torch {torch.__version__})")
    if info["cuda"]:
        print(f"  CUDA kernels: yes (CUDA {info['cuda_version']}, archs {info['cuda_archs']})")
    else:
        print("  CUDA kernels: no (CPU-only build)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"  GPUs visible: {count}")
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        print(f"    cuda:{index} {props.name}, sm_{props.major}{props.minor}, "
              f"{props.total_memory / 2**30:.1f} GiB")
    ops = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("fastllm::"))
    print(f"  ops ({len(ops)}): {', '.join(ops)}")


if __name__ == "__main__":
    main()
