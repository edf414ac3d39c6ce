# One C++ runtime per process. torch loads the shared libstdc++.so.6; the extension must link the
# same shared library, never embed a static copy: with two runtimes in one process, formatting an
# integer into an error message (iostream, locale facets) crashes with SIGSEGV instead of raising
# (docs/cuda.md, "The C++ runtime").
#
# A GNU toolchain whose libstdc++.so is missing (a relocated GCC where it is a dangling link, or
# one that ships only libstdc++.a) makes `-lstdc++` fall back silently to the static archive
# (and `-fopenmp` to libgomp.a). memops_use_shared_cxx_runtime() then links the shared library
# that torch has loaded instead;
# memops_check_cxx_runtime() fails the build if the module still raises no clean error.

option(MEMOPS_CHECK_CXX_RUNTIME "After linking, check that an error raised by the module reaches
Python as an exception (one C++ runtime in the process)" ON)

# Links `lib` (libstdc++ or libgomp) as the shared library that `import torch` has mapped when the
# compiler has no usable shared one (its archive would be linked instead, silently).
function(_memops_use_loaded_runtime target lib pattern)
  execute_process(COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=${lib}.so
                  OUTPUT_VARIABLE _so OUTPUT_STRIP_TRAILING_WHITESPACE)
  # EXISTS follows links: a dangling one counts as missing. Without a match, GCC prints the
  # bare name back.
  if(IS_ABSOLUTE "${_so}" AND EXISTS "${_so}")
    return()
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import torch; print(next(l.split()[-1] for l in open('/proc/self/maps') if '${pattern}' in l))"
    OUTPUT_VARIABLE _loaded OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_loaded}")
    message(FATAL_ERROR
      "torch_memops: ${CMAKE_CXX_COMPILER} has no shared ${lib}.so (`-print-file-name` gave "
      "\"${_so}\"), so it would link the static ${lib}.a into the extension: a second runtime "
      "next to torch's (for libstdc++, the first error message crashes). `import torch` maps "
      "no ${lib} either. Build with a compiler that has its shared runtime, e.g. "
      "`CXX=/usr/bin/g++ pip install --no-build-isolation .` or -DCMAKE_CXX_COMPILER=/usr/bin/g++.")
  endif()
  set(_dir ${CMAKE_BINARY_DIR}/memops_runtime_libs)
  file(MAKE_DIRECTORY ${_dir})
  file(CREATE_LINK ${_loaded} ${_dir}/${lib}.so SYMBOLIC)
  # -L directories come before the compiler's own, so `-l` finds the shared library here.
  target_link_directories(${target} BEFORE PRIVATE ${_dir})
  message(STATUS "torch_memops: ${CMAKE_CXX_COMPILER} has no shared ${lib}.so (it would link "
                 "${lib}.a: two runtimes in one process); linking ${_loaded}, the one torch "
                 "loads")
endfunction()

function(memops_use_shared_cxx_runtime target)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU" OR NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
    return()
  endif()
  _memops_use_loaded_runtime(${target} libstdc++ "/libstdc++.so")
  _memops_use_loaded_runtime(${target} libgomp "/libgomp")  # torch may ship it renamed
endfunction()

function(memops_check_cxx_runtime target)
  if(NOT MEMOPS_CHECK_CXX_RUNTIME)
    return()
  endif()
  add_custom_command(
    TARGET ${target} POST_BUILD
    COMMAND "${Python_EXECUTABLE}" ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/check_cxx_runtime.py
            $<TARGET_FILE:${target}>
    COMMENT "torch_memops: checking that an error of the module raises in Python"
    VERBATIM)
endfunction()
