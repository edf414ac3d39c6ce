# The FPGA backend: the fpga device, the runtime (strict emulation always; native XRT when its
# headers and libraries are found) and the HLS kernels compiled for the host, which the emulation
# runs. Included by the top-level CMakeLists.txt.
#
# The extension compiles the kernels against hls/common/host_types.h (the same memory layout as
# ap_uint<512>), so that it builds without the vendor headers; C-simulation (hls/Makefile) compiles
# the same sources against the vendor ap_int.h / hls_stream.h.
#
# MEMOPS_XRT: AUTO builds the native XRT runtime when XRT is found (Debian's libxrt-dev, or
# /opt/xilinx/xrt from Xilinx's packages via XILINX_XRT); OFF never; ON requires it.
set(MEMOPS_XRT "AUTO" CACHE STRING "Build the native XRT runtime: AUTO, ON or OFF")

file(GLOB MEMOPS_FPGA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/../csrc/fpga/*.cpp)
set(MEMOPS_HLS_KERNEL_SOURCES
    ${CMAKE_CURRENT_LIST_DIR}/../hls/prepare_memory/prepare_memory.cpp
    ${CMAKE_CURRENT_LIST_DIR}/../hls/topk_relevancy/topk_relevancy.cpp
    ${CMAKE_CURRENT_LIST_DIR}/../hls/gather_retrieve/gather_retrieve.cpp)
list(APPEND MEMOPS_SOURCES ${MEMOPS_FPGA_SOURCES} ${MEMOPS_HLS_KERNEL_SOURCES})

set(MEMOPS_WITH_XRT OFF)
if(NOT MEMOPS_XRT STREQUAL "OFF")
  find_path(XRT_INCLUDE_DIR NAMES xrt/xrt_bo.h
            HINTS $ENV{XILINX_XRT}/include /opt/xilinx/xrt/include /usr/include/xrt)
  find_library(XRT_COREUTIL_LIBRARY NAMES xrt_coreutil
               HINTS $ENV{XILINX_XRT}/lib /opt/xilinx/xrt/lib)
  # xrt::uuid calls libuuid inline; libuuid.so.1 (an XRT dependency) serves when uuid-dev is absent.
  find_library(XRT_UUID_LIBRARY NAMES uuid libuuid.so.1)
  if(XRT_INCLUDE_DIR AND XRT_COREUTIL_LIBRARY)
    set(MEMOPS_WITH_XRT ON)
    message(STATUS "torch_memops: native XRT runtime (${XRT_COREUTIL_LIBRARY})")
  elseif(MEMOPS_XRT STREQUAL "ON")
    message(FATAL_ERROR "MEMOPS_XRT=ON but no XRT (xrt/xrt_bo.h, libxrt_coreutil) was found; "
                        "install libxrt-dev or set XILINX_XRT")
  else()
    message(STATUS "torch_memops: XRT not found; the fpga device runs in emulation only")
  endif()
endif()

function(memops_configure_fpga target)
  set(_root ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/..)
  target_include_directories(${target} PRIVATE ${_root}/hls ${_root}/hls/common)
  set_source_files_properties(${MEMOPS_HLS_KERNEL_SOURCES} PROPERTIES COMPILE_OPTIONS
                              "-Wno-unknown-pragmas;-Wno-unused-label")
  set_source_files_properties(${MEMOPS_FPGA_SOURCES} PROPERTIES COMPILE_OPTIONS
                              "-Wno-unknown-pragmas;-Wno-unused-label")
  if(MEMOPS_WITH_XRT)
    target_include_directories(${target} SYSTEM PRIVATE ${XRT_INCLUDE_DIR})
    target_compile_definitions(${target} PRIVATE MEMOPS_WITH_XRT)
    target_link_libraries(${target} PRIVATE ${XRT_COREUTIL_LIBRARY})
    if(XRT_UUID_LIBRARY)
      target_link_libraries(${target} PRIVATE ${XRT_UUID_LIBRARY})
    endif()
  endif()
endfunction()
