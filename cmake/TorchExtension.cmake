# Finds the installed PyTorch without Caffe2's CMake config: that config insists on CUDA libraries
# (nvrtc, cuBLAS) which a toolkit may lack even though this extension only needs the runtime.
# Sets TORCH_INCLUDE_DIRS, TORCH_LIBRARY_DIR, TORCH_HAS_CUDA, TORCH_CXX11_ABI, TORCH_VERSION,
# TORCH_VISIBLE_GPU_ARCH (e.g. "9.0", empty without a visible GPU).
set(_torch_info_file "${CMAKE_CURRENT_BINARY_DIR}/torch_info.cmake")
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import os, sys, torch
root = os.path.dirname(torch.__file__).replace(os.sep, "/")
try:
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
except Exception:
    cap = None
lines = [
    f'set(TORCH_INCLUDE_DIRS "{root}/include;{root}/include/torch/csrc/api/include")',
    f'set(TORCH_LIBRARY_DIR "{root}/lib")',
    f'set(TORCH_HAS_CUDA {int(torch.version.cuda is not None)})',
    f'set(TORCH_CXX11_ABI {int(torch._C._GLIBCXX_USE_CXX11_ABI)})',
    f'set(TORCH_VERSION "{torch.__version__}")',
    f'set(TORCH_VISIBLE_GPU_ARCH "{"" if cap is None else f"{cap[0]}.{cap[1]}"}")',
]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
]=] "${_torch_info_file}"
  RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "qlora_ext: `import torch` failed with ${Python_EXECUTABLE}. Install torch first "
                      "(the build runs without isolation so that it compiles against your torch).")
endif()
include("${_torch_info_file}")

foreach(_lib c10 torch torch_cpu)
  find_library(TORCH_${_lib}_LIBRARY NAMES ${_lib} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
endforeach()
set(TORCH_CPU_LIBRARIES ${TORCH_c10_LIBRARY} ${TORCH_torch_LIBRARY} ${TORCH_torch_cpu_LIBRARY})
if(TORCH_HAS_CUDA)
  foreach(_lib c10_cuda torch_cuda)
    find_library(TORCH_${_lib}_LIBRARY NAMES ${_lib} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
  endforeach()
  set(TORCH_CUDA_LIBRARIES ${TORCH_c10_cuda_LIBRARY} ${TORCH_torch_cuda_LIBRARY})
endif()

# TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "8.0+PTX 9.0") -> CMAKE_CUDA_ARCHITECTURES ("80-real;90a-real;80-virtual").
function(qlora_cuda_architectures arch_list out_var)
  string(REPLACE " " ";" _archs "${arch_list}")
  set(_result "")
  foreach(_arch IN LISTS _archs)
    if(_arch STREQUAL "")
      continue()
    endif()
    string(REGEX MATCH "^([0-9]+)\\.([0-9]+)([af]?)(\\+PTX)?$" _ok "${_arch}")
    if(NOT _ok)
      message(FATAL_ERROR "qlora_ext: cannot read '${_arch}' in TORCH_CUDA_ARCH_LIST='${arch_list}' "
                          "(expected entries such as 8.0, 9.0a or 8.0+PTX)")
    endif()
    set(_num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    list(APPEND _result "${_num}-real")
    if(CMAKE_MATCH_4)
      list(APPEND _result "${_num}-virtual")
    endif()
  endforeach()
  set(${out_var} "${_result}" PARENT_SCOPE)
endfunction()
