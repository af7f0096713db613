# Sourced by cuda_device_run.sh and cuda_device_ab.sh. The device tool returns at most 8 files
# from $OUT (/work/.library/device/README.md, "Limits"); a call with parallel tests, profiles or
# an A/B writes more, and the rest were lost (2026-11-29: the A/B's JSON and the tests' logs).
# pack_out DIR: every file under DIR but the markdown (the tables people read first) into
# DIR/results.tar.gz, removed from where they were.
pack_out() {
  local dir=$1 list=/tmp/pack_out.list
  (cd "$dir" && find . -type f ! -name '*.md' ! -name results.tar.gz | sort >"$list" &&
    [ -s "$list" ] && tar -czf results.tar.gz -T "$list" &&
    xargs -d '\n' rm -f <"$list" && find . -mindepth 1 -type d -empty -delete) &&
    echo "packed $(wc -l <"$list") files into $dir/results.tar.gz"
}
