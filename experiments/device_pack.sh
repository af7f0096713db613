# Sourced by cuda_device_run.sh and cuda_device_ab.sh. The device tool returns at most 8 files
# from $OUT, 16 MiB each (/work/.library/device/README.md, "Limits"); a call with parallel tests,
# profiles or an A/B writes more, and the rest were lost (2026-11-29: the A/B's JSON and two
# test shards' logs).
# pack_out DIR: every file under DIR into one new archive DIR/results[_N].tar.gz (the first
# name not taken, so an earlier pack is never overwritten), the files other than markdown
# removed once it is written; the markdown (the tables people read first) stays beside it too.
# Earlier archives are not packed again, nor a folder with only markdown left. Returns 1 where
# the archive cannot be written (the files then stay where they were).
pack_out() {
  local dir=$1 name=results.tar.gz n=1 count
  local files=(. -type f ! -name 'results*.tar.gz' ! -name '.pack_*')  # find's test: what goes in
  while [ -e "$dir/$name" ]; do n=$((n + 1)); name=results_$n.tar.gz; done
  # Only markdown left (the tables an earlier pack kept beside its archive): nothing new.
  count=$(cd "$dir" && find "${files[@]}" ! -name '*.md' | wc -l)
  if [ "$count" = 0 ]; then echo "pack: nothing to pack in $dir"; return 0; fi
  # NUL-separated names (tar reads them verbatim: spaces, backslashes); written under a
  # temporary name and renamed only once complete.
  if ! (cd "$dir" && find "${files[@]}" -print0 |
        tar --null -czf ".pack_$name" -T - && mv ".pack_$name" "$name"); then
    rm -f "$dir/.pack_$name"
    echo "pack: could not write $dir/$name; the files stay where they were" >&2
    return 1
  fi
  (cd "$dir" && find "${files[@]}" ! -name '*.md' -delete &&
    find . -mindepth 1 -type d -empty -delete)
  echo "packed $count files (and the markdown) into $dir/$name ($(du -h "$dir/$name" | cut -f1))"
  [ "$(stat -c %s "$dir/$name")" -le $((16 << 20)) ] ||
    echo "pack: $dir/$name is over the device tool's 16 MiB a file: it will not come back" >&2
  return 0
}
