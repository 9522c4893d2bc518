# Compiles proto/ plus the googleapis protos it imports into one library.
# The googleapis protos come from Debian's libgoogle-common-protos-java: a jar
# is a zip, unpacked into the build tree (never copied into the repo). The
# same folder serves buf (see buf.yaml).
set(MV_GOOGLEAPIS_JAR /usr/share/java/proto-google-common-protos-1.16.0.jar)
set(MV_GOOGLEAPIS_DIR ${CMAKE_SOURCE_DIR}/build/googleapis)
if(NOT EXISTS ${MV_GOOGLEAPIS_JAR})
  message(FATAL_ERROR "Missing ${MV_GOOGLEAPIS_JAR}: run scripts/install-deps.sh")
endif()
if(NOT EXISTS ${MV_GOOGLEAPIS_DIR}/google/rpc/status.proto)
  file(MAKE_DIRECTORY ${MV_GOOGLEAPIS_DIR})
  file(ARCHIVE_EXTRACT INPUT ${MV_GOOGLEAPIS_JAR} DESTINATION ${MV_GOOGLEAPIS_DIR}
       PATTERNS "google/api/*.proto" "google/rpc/*.proto" "google/type/*.proto")
endif()

set(MV_GOOGLEAPIS_PROTOS
  google/api/field_behavior.proto
  google/api/resource.proto
  google/rpc/status.proto
  google/rpc/error_details.proto
  google/rpc/code.proto)
file(GLOB MV_OWN_PROTOS RELATIVE ${CMAKE_SOURCE_DIR}/proto CONFIGURE_DEPENDS
     ${CMAKE_SOURCE_DIR}/proto/modelvault/v1/*.proto)

set(MV_GEN_DIR ${CMAKE_BINARY_DIR}/gen)
file(MAKE_DIRECTORY ${MV_GEN_DIR})
set(MV_PROTO_SRCS)
set(MV_DESCRIPTOR_SET ${MV_GEN_DIR}/modelvault_descriptor_set.binpb)

function(mv_compile_proto rel root with_grpc)
  string(REGEX REPLACE "\\.proto$" "" base ${rel})
  set(outs ${MV_GEN_DIR}/${base}.pb.cc ${MV_GEN_DIR}/${base}.pb.h)
  set(args --cpp_out=${MV_GEN_DIR})
  if(with_grpc)
    list(APPEND outs ${MV_GEN_DIR}/${base}.grpc.pb.cc ${MV_GEN_DIR}/${base}.grpc.pb.h)
    list(APPEND args --grpc_out=${MV_GEN_DIR}
         --plugin=protoc-gen-grpc=$<TARGET_FILE:gRPC::grpc_cpp_plugin>)
  endif()
  add_custom_command(
    OUTPUT ${outs}
    COMMAND protobuf::protoc ${args} -I${root} -I${CMAKE_SOURCE_DIR}/proto -I${MV_GOOGLEAPIS_DIR}
            -I${Protobuf_INCLUDE_DIR} ${rel}
    WORKING_DIRECTORY ${root}
    DEPENDS ${root}/${rel} protobuf::protoc
    COMMENT "protoc ${rel}"
    VERBATIM)
  list(FILTER outs INCLUDE REGEX "\\.cc$")
  set(MV_PROTO_SRCS ${MV_PROTO_SRCS} ${outs} PARENT_SCOPE)
endfunction()

foreach(p ${MV_GOOGLEAPIS_PROTOS})
  mv_compile_proto(${p} ${MV_GOOGLEAPIS_DIR} OFF)
endforeach()
# grpc.health.v1 from Debian's grpc-proto: gRPC's built-in health service has
# no descriptor of its own, and reflection clients (buf curl, grpcurl) need one.
set(MV_GRPC_PROTO_DIR /usr/share/grpc-proto)
if(NOT EXISTS ${MV_GRPC_PROTO_DIR}/grpc/health/v1/health.proto)
  message(FATAL_ERROR "Missing ${MV_GRPC_PROTO_DIR}: run scripts/install-deps.sh")
endif()
mv_compile_proto(grpc/health/v1/health.proto ${MV_GRPC_PROTO_DIR} OFF)
foreach(p ${MV_OWN_PROTOS})
  mv_compile_proto(${p} ${CMAKE_SOURCE_DIR}/proto ON)
endforeach()

add_library(mv_proto STATIC ${MV_PROTO_SRCS})
target_include_directories(mv_proto SYSTEM PUBLIC ${MV_GEN_DIR})
target_link_libraries(mv_proto PUBLIC protobuf::libprotobuf gRPC::grpc++)
