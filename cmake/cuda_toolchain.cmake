# Prepares a CUDA toolchain that torch's CMake package accepts, on machines where the toolkit is
# incomplete. Each fix applies only when the thing it supplies is not already found.

enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

# torch turns TORCH_CUDA_ARCH_LIST into -gencode flags and ignores CMAKE_CUDA_ARCHITECTURES; without
# a list it would probe the build machine's GPU, which build machines often lack.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} OR "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;8.6;8.9;9.0+PTX")
endif()
set(CMAKE_CUDA_ARCHITECTURES OFF)

find_package(CUDAToolkit REQUIRED)

# torch's FindCUDA locates the toolkit from nvcc's path; when nvcc is a wrapper script elsewhere it
# fails with "missing: CUDA_INCLUDE_DIRS". The compiler CMake just validated knows the real root.
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  if(CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
    set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
  else()
    get_filename_component(CUDA_TOOLKIT_ROOT_DIR "${CUDAToolkit_BIN_DIR}/.." ABSOLUTE)
  endif()
endif()

# pip's CUDA builds of torch ship the CUDA libraries as nvidia-* wheels. A bare toolkit may lack
# the cuBLAS/cuSPARSE headers ATen's CUDA headers include and nvrtc; take them from those wheels.
fastllm_python_query(nvidia_wheel_roots [=[
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
roots = []
for base in (spec.submodule_search_locations if spec else []):
    for path in sorted(pathlib.Path(base).iterdir()):
        if (path / "include").is_dir() or (path / "lib").is_dir():
            roots.append(str(path))
print(";".join(roots))
]=])

set(FASTLLM_CUDA_EXTRA_INCLUDE "")
set(toolkit_has_cublas OFF)
foreach(dir IN LISTS CUDAToolkit_INCLUDE_DIRS)
  if(EXISTS "${dir}/cublas_v2.h" AND EXISTS "${dir}/cusparse.h")
    set(toolkit_has_cublas ON)
  endif()
endforeach()
if(NOT toolkit_has_cublas)
  set(hints "")
  foreach(root IN LISTS nvidia_wheel_roots)
    list(APPEND hints "${root}/include")
  endforeach()
  find_path(FASTLLM_CUBLAS_INCLUDE cublas_v2.h HINTS ${hints} NO_DEFAULT_PATH)
  find_path(FASTLLM_CUSPARSE_INCLUDE cusparse.h HINTS ${hints} NO_DEFAULT_PATH)
  if(NOT FASTLLM_CUBLAS_INCLUDE OR NOT FASTLLM_CUSPARSE_INCLUDE)
    message(FATAL_ERROR "fastllm: the CUDA toolkit at ${CUDA_TOOLKIT_ROOT_DIR} lacks cublas_v2.h or "
                        "cusparse.h and no nvidia-* wheel provides them; install the toolkit's "
                        "cuBLAS and cuSPARSE development headers.")
  endif()
  set(FASTLLM_CUDA_EXTRA_INCLUDE "${FASTLLM_CUBLAS_INCLUDE}" "${FASTLLM_CUSPARSE_INCLUDE}")
  list(REMOVE_DUPLICATES FASTLLM_CUDA_EXTRA_INCLUDE)
  message(STATUS "fastllm: cuBLAS/cuSPARSE headers from ${FASTLLM_CUDA_EXTRA_INCLUDE}")
endif()

if(NOT CUDA_nvrtc_LIBRARY)
  set(hints "${CUDAToolkit_LIBRARY_DIR}")
  foreach(root IN LISTS nvidia_wheel_roots)
    list(APPEND hints "${root}/lib")
  endforeach()
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12 HINTS ${hints})
endif()
