# cuDNN for the CUDA backend's dense miss (src/kernels/cuda/cudnn_attention.cpp):
# the library and headers of cuDNN 9 and the header-only cudnn-frontend.
# Looked for under AE_CUDNN_ROOT / AE_CUDNN_FRONTEND_ROOT (a folder with
# include/ and lib/, or the unpacked PyPI wheels), the CUDA toolkit, and the
# PyPI packages nvidia-cudnn-cu13 / nvidia-cudnn-frontend of the Python that
# CMake finds (pip's isolated build hides them: use --no-build-isolation or
# the ROOT hints). Sets ae_cudnn_found, AE_CUDNN_INCLUDE_DIRS, AE_CUDNN_LIBRARY (opened
# at run time when the loader's path has no libcudnn.so.9).
set(AE_CUDNN_ROOT "" CACHE PATH "cuDNN 9: a folder with include/cudnn.h and lib/libcudnn.so*")
set(AE_CUDNN_FRONTEND_ROOT "" CACHE PATH "cudnn-frontend: a folder with include/cudnn_frontend.h")
set(AE_NVRTC_ROOT "" CACHE PATH "NVRTC (cudnn-frontend's headers need nvrtc.h): a folder with include/")

set(ae_cudnn_hints ${AE_CUDNN_ROOT} ${AE_CUDNN_ROOT}/nvidia/cudnn ${CUDAToolkit_LIBRARY_ROOT})
set(ae_frontend_hints ${AE_CUDNN_FRONTEND_ROOT})
set(ae_nvrtc_hints ${AE_NVRTC_ROOT} ${AE_NVRTC_ROOT}/nvidia/cu13 ${CUDAToolkit_LIBRARY_ROOT})
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import site, sysconfig; print(';'.join([sysconfig.get_paths()['purelib']] + site.getsitepackages() + [site.getusersitepackages()]))"
    OUTPUT_VARIABLE ae_site_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  foreach(dir IN LISTS ae_site_dirs)
    list(APPEND ae_cudnn_hints ${dir}/nvidia/cudnn ${dir}/nvidia/cu13)
    list(APPEND ae_frontend_hints ${dir})
    list(APPEND ae_nvrtc_hints ${dir}/nvidia/cu13 ${dir}/nvidia/cuda_nvrtc)
  endforeach()
endif()

find_path(AE_CUDNN_INCLUDE_DIR cudnn.h HINTS ${ae_cudnn_hints} PATH_SUFFIXES include)
# The wheel ships only the versioned name.
find_library(AE_CUDNN_LIBRARY NAMES cudnn libcudnn.so.9 HINTS ${ae_cudnn_hints} PATH_SUFFIXES lib lib64)
find_path(AE_CUDNN_FRONTEND_INCLUDE_DIR cudnn_frontend.h HINTS ${ae_frontend_hints} PATH_SUFFIXES include)
# The frontend's headers include nvrtc.h (NVRTC is opened at run time, for
# engines of other GPUs than ours); the toolkit may lack it where the pip
# wheel has it.
find_path(AE_NVRTC_INCLUDE_DIR nvrtc.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ${ae_nvrtc_hints} PATH_SUFFIXES include)

if(AE_CUDNN_INCLUDE_DIR AND AE_CUDNN_LIBRARY AND AE_CUDNN_FRONTEND_INCLUDE_DIR AND AE_NVRTC_INCLUDE_DIR)
  set(ae_cudnn_found ON)
  set(AE_CUDNN_INCLUDE_DIRS ${AE_CUDNN_INCLUDE_DIR} ${AE_CUDNN_FRONTEND_INCLUDE_DIR} ${AE_NVRTC_INCLUDE_DIR})
else()
  set(ae_cudnn_found OFF)
endif()
