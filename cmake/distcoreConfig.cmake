# find_package(distcore) support for an installed distcore
# (<prefix>/lib/cmake/distcore/distcoreConfig.cmake).
#
# Targets:
#   distcore::distcore         the shared library (libdistcore.so)
#   distcore::distcore_static  the static library (libdistcore.a)
get_filename_component(_distcore_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

if(NOT TARGET distcore::distcore)
  add_library(distcore::distcore SHARED IMPORTED)
  set_target_properties(distcore::distcore PROPERTIES
    IMPORTED_LOCATION "${_distcore_prefix}/lib/libdistcore.so"
    IMPORTED_SONAME "libdistcore.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_distcore_prefix}/include")
endif()

if(NOT TARGET distcore::distcore_static)
  add_library(distcore::distcore_static STATIC IMPORTED)
  set_target_properties(distcore::distcore_static PROPERTIES
    IMPORTED_LOCATION "${_distcore_prefix}/lib/libdistcore.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_distcore_prefix}/include"
    INTERFACE_LINK_LIBRARIES "pthread;dl;m")
endif()

set(distcore_INCLUDE_DIRS "${_distcore_prefix}/include")
set(distcore_LIBRARIES distcore::distcore)
unset(_distcore_prefix)
