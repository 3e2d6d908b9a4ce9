# Installs the build tree into a fresh prefix, then configures, builds and runs
# a separate project that finds it with find_package(FlexModel), and runs the
# installed tools on a fixture.
file(REMOVE_RECURSE ${WORK_DIR})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "failed (${result}): ${ARGV}")
  endif()
endfunction()
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${WORK_DIR}/build -G Ninja -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/consumer)
if(FIXTURE_DIR)
  run(${WORK_DIR}/prefix/bin/flex-inspect ${FIXTURE_DIR}/gpt_scripted.pt --input ${FIXTURE_DIR}/tokens.npy)
  run(${WORK_DIR}/prefix/bin/flex-dump --model ${FIXTURE_DIR}/gpt_scripted.pt --input ${FIXTURE_DIR}/tokens.npy
      --hooks layers.0.mlp --out ${WORK_DIR}/installed_dump.h5)
endif()
