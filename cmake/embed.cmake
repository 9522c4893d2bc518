# Embeds data files (migrations, the seed catalog) into the binary, so that
# one executable carries everything it needs at run time.
set(MV_EMBED_SCRIPT ${CMAKE_SOURCE_DIR}/cmake/embed_files.cmake)
file(GLOB MV_MIGRATION_FILES CONFIGURE_DEPENDS
     ${CMAKE_SOURCE_DIR}/migrations/postgres/*.sql
     ${CMAKE_SOURCE_DIR}/migrations/sqlite/*.sql)
file(GLOB MV_SEED_FILES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/migrations/seed/*.textproto)
set(MV_EMBED_INPUTS ${MV_MIGRATION_FILES} ${MV_SEED_FILES})
set(MV_EMBED_OUT ${CMAKE_BINARY_DIR}/gen/embedded_files.cc)
add_custom_command(
  OUTPUT ${MV_EMBED_OUT}
  COMMAND ${CMAKE_COMMAND} -DOUT=${MV_EMBED_OUT} -DROOT=${CMAKE_SOURCE_DIR}
          "-DFILES=${MV_EMBED_INPUTS}" -P ${MV_EMBED_SCRIPT}
  DEPENDS ${MV_EMBED_INPUTS} ${MV_EMBED_SCRIPT}
  COMMENT "Embedding migrations and seed data"
  VERBATIM)
add_library(mv_embedded STATIC ${MV_EMBED_OUT})
target_include_directories(mv_embedded PUBLIC ${CMAKE_SOURCE_DIR})
