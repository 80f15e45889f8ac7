#!/usr/bin/env bats
# Encrypted images: legacy AES (crypt_method 1) and LUKS (crypt_method 2).
# Images encrypted by qemu-img read identically through the plugin;
# writes through the plugin read back identically in QEMU; password
# forms; wrong, missing and damaged keys are refused quickly and cleanly;
# images made by qcow2-tool create open in QEMU; qcow2-tool info shows
# the parameters without a password.

bats_require_minimum_version 1.5.0
load helpers

if [ "${SANITIZE:-}" = 1 ]; then
    TOOL="${QCOW2_TOOL:-$BATS_TEST_DIRNAME/../build-san/qcow2-tool}"
else
    TOOL="${QCOW2_TOOL:-$BATS_TEST_DIRNAME/../tools/qcow2-tool}"
fi
PW="s3cret-Pass"
SEC="secret,id=sec0,data=$PW"
SIZE=16M

teardown () { stop_nbdkit; }

# tnbdkit ARGS...: nbdkit killed after 10 s (timeout bypasses the
# helpers' nbdkit function, so preload the sanitizer runtime here).
tnbdkit () { timeout_nbdkit 10 "$@"; }

# qopts IMG: the --image-opts string that opens IMG with the secret.
qopts ()
{
    echo "driver=qcow2,file.filename=$1,encrypt.key-secret=sec0"
}

# qcreate ARGS...: qemu-img create, retried: with LUKS it sometimes fails
# with "Unable to get accurate CPU usage" while timing PBKDF2.
qcreate ()
{
    qemu_img_create -q -f qcow2 --object "$SEC" "$@"
}

# qio IMG QEMU-IO-ARGS...: qemu-io on an encrypted image; fails if any
# command fails or a pattern does not verify.
qio ()
{
    local img="$1" out; shift
    out="$(qemu-io --object "$SEC" -d unmap --image-opts "$@" \
             "$(qopts "$img")" 2>&1)" &&
        ! grep -qiE 'failed|error|invalid|mismatch' <<<"$out" ||
        { echo "qemu-io on $img:" >&3; echo "$out" >&3; return 1; }
}

# qcheck IMG: qemu-img check with the secret must be clean.
qcheck ()
{
    local out rc=0
    out="$(qemu-img check --object "$SEC" --image-opts "$(qopts "$1")" 2>&1)" ||
        rc=$?
    if [ "$rc" -ne 0 ] || ! grep -q 'No errors were found' <<<"$out"; then
        echo "qemu-img check $1: rc=$rc" >&3; echo "$out" | head -30 >&3
        return 1
    fi
}

# qcompare A B: the guest contents of two encrypted images are equal.
qcompare ()
{
    run -0 qemu-img compare --object "$SEC" --image-opts \
        "$(qopts "$1")" "$(qopts "$2")"
}

# The patterns every image made here is filled with.
FILL=(-c 'write -P 0xa1 0 1M' -c 'write -P 0xb2 3M 512k'
      -c 'write -P 0xc3 5243007 100000' -c 'write -z 6M 64k'
      -c 'write -P 0xd4 15M 1M')

# Reads, writes, zeroes and discards, aligned and not, done both through
# the plugin and directly by QEMU.
OPS=(-c 'write -P 0x11 1000 3000' -c 'write -P 0x22 65000 70000'
     -c 'write -P 0x33 2M 128k' -c 'write -P 0x44 123457 1'
     -c 'write -z 3100000 200000' -c 'write -z 512k 128k'
     -c 'discard 4M 192k' -c 'write -P 0x55 16776000 1216'
     -c 'write -P 0x66 8M 64k' -c 'discard 8M 64k'
     -c 'write -P 0x77 10485761 777777' -c 'write -z 15M 4096')

setup_file ()
{
    local d="$BATS_FILE_TMPDIR"
    cd "$d"
    printf '%s' "$PW" >"$d/pw"
    printf '%s\n' "$PW" >"$d/pw-nl"
    qcreate -o encrypt.format=aes,encrypt.key-secret=sec0 \
        "$d/aes.qcow2" $SIZE
    qcreate -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
        "$d/luks.qcow2" $SIZE
    qcreate -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256 \
        "$d/luks-cbc.qcow2" $SIZE
    qcreate -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.hash-alg=sha1 \
        "$d/luks-sha1.qcow2" $SIZE
    for f in aes luks luks-cbc luks-sha1; do
        qemu-io --object "$SEC" --image-opts "${FILL[@]}" \
            "driver=qcow2,file.filename=$d/$f.qcow2,encrypt.key-secret=sec0" \
            >/dev/null
    done
}

# check_read IMG: the plugin serves what QEMU decrypts.
check_read ()
{
    local img="$BATS_FILE_TMPDIR/$1.qcow2"
    cd "$BATS_TEST_TMPDIR"
    run -0 qemu-img convert --object "$SEC" --image-opts "$(qopts "$img")" \
        -O raw qemu.raw
    start_nbdkit "$PLUGIN" file="$img" password="$PW" --readonly
    run -0 nbdcopy "$uri" plugin.raw
    run -0 cmp qemu.raw plugin.raw
    # Reads that do not start or end on a sector, small and large (these
    # decrypt through a bounce buffer, a cluster at a time).
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c '
raw = open("qemu.raw", "rb").read()
for off, n in ((1, 5), (511, 2), (4097, 3 << 20), (65535, 200001),
               (len(raw) - 1000, 999), (12345, 65536), (0, 513)):
    n = min(n, len(raw) - off)
    assert h.pread(n, off) == raw[off:off + n], (off, n)
'
    # Not trivially equal: the data is there, and the file holds only
    # ciphertext.
    cmp -n 1M plugin.raw <(head -c 1M /dev/zero | tr '\0' '\241')
    ! grep -qaF "$(printf '\241\241\241\241\241\241\241\241')" "$img" || false
}

@test "read: legacy AES image written by qemu-io" { check_read aes; }
@test "read: LUKS default (aes-256 xts-plain64 sha256)" { check_read luks; }
@test "read: LUKS aes-128 cbc-essiv:sha256" { check_read luks-cbc; }
@test "read: LUKS with hash sha1" { check_read luks-sha1; }

# check_write IMG: the same operations through the plugin and in QEMU
# give the same guest data, and the plugin's image is clean.
check_write ()
{
    cd "$BATS_TEST_TMPDIR"
    cp "$BATS_FILE_TMPDIR/$1.qcow2" viaplugin.qcow2
    cp "$BATS_FILE_TMPDIR/$1.qcow2" viaqemu.qcow2
    start_nbdkit "$PLUGIN" file="$PWD/viaplugin.qcow2" password="$PW"
    run -0 qemu-io -f raw -d unmap "${OPS[@]}" "$uri"
    ! grep -qiE 'failed|error' <<<"$output" || false
    stop_nbdkit
    qio viaqemu.qcow2 "${OPS[@]}"
    qcompare viaplugin.qcow2 viaqemu.qcow2
    qcheck viaplugin.qcow2
    # And the plugin reads back what it wrote.
    run -0 qemu-img convert --object "$SEC" \
        --image-opts "$(qopts viaqemu.qcow2)" -O raw qemu.raw
    start_nbdkit "$PLUGIN" file="$PWD/viaplugin.qcow2" password="$PW" \
        --readonly
    run -0 nbdcopy "$uri" plugin.raw
    run -0 cmp qemu.raw plugin.raw
}

@test "write: legacy AES, plugin writes read back in QEMU" { check_write aes; }
@test "write: LUKS default, plugin writes read back in QEMU" { check_write luks; }
@test "write: LUKS cbc-essiv, plugin writes read back in QEMU" { check_write luks-cbc; }
@test "write: LUKS sha1, plugin writes read back in QEMU" { check_write luks-sha1; }

@test "compressed clusters in encrypted images (qemu-io write -c): read, overwritten in part, as in QEMU" {
    local f
    cd "$BATS_TEST_TMPDIR"
    for f in aes luks; do
        cp "$BATS_FILE_TMPDIR/$f.qcow2" viaplugin.qcow2
        # QEMU stores compressed clusters unencrypted, even here.
        qio viaplugin.qcow2 -c 'write -c -P 0x5a 8M 64k' -c 'write -c -P 0x6b 12M 64k'
        cp viaplugin.qcow2 viaqemu.qcow2
        run -0 qemu-img convert --object "$SEC" \
            --image-opts "$(qopts viaqemu.qcow2)" -O raw qemu.raw
        run -0 nbdkit -U - "$PLUGIN" file="$PWD/viaplugin.qcow2" \
            password="$PW" --readonly --run 'nbdcopy "$uri" plugin.raw'
        cmp qemu.raw plugin.raw
        cmp -i 8M:0 -n 64k plugin.raw <(head -c 64k /dev/zero | tr '\0' '\132')
        # Partial writes copy the rest of the cluster up, encrypted.
        local ops=(-c 'write -P 0x01 8389000 10' -c 'write -z 12M 4k')
        run -0 nbdkit -U - "$PLUGIN" file="$PWD/viaplugin.qcow2" \
            password="$PW" --run "qemu-io -f raw $(printf "%q " "${ops[@]}") \"\$uri\""
        [[ "$output" != *failed* ]] || { echo "$f: $output"; return 1; }
        qio viaqemu.qcow2 "${ops[@]}"
        qcompare viaplugin.qcow2 viaqemu.qcow2
        qcheck viaplugin.qcow2
    done
}

@test "qcow2-tool create: password files lose trailing newlines as with +FILE; non-UTF-8 passwords are refused" {
    cd "$BATS_TEST_TMPDIR"
    printf '%s\n\n' "$PW" > pw2
    "$TOOL" create -q -o encrypt.format=luks,encrypt.iter-time=10 \
        --password-file pw2 a.qcow2 1M
    run -0 nbdkit -U - "$PLUGIN" file="$PWD/a.qcow2" password=+"$PWD/pw2" \
        --run 'nbdinfo --size "$uri"'
    [ "$output" = 1048576 ]
    qio a.qcow2 -c 'read -P 0 0 1M'
    run -1 "$TOOL" create -q -o encrypt.format=luks \
        --password "$(printf 'a\377b')" b.qcow2 1M
    [[ "$output" == *"not valid UTF-8"* ]]
    [ ! -e b.qcow2 ]
}

@test "qcow2-tool without a password: check and map of encrypted images, info and create over an encrypted base" {
    local f
    cd "$BATS_TEST_TMPDIR"
    for f in aes luks; do
        local img="$BATS_FILE_TMPDIR/$f.qcow2"
        run -0 "$TOOL" check -U "$img"
        [[ "$output" == *"No errors were found on the image."* ]]
        "$TOOL" check -U --json "$img" > t.json
        qemu-img check -U --output=json --object "$SEC" \
            --image-opts "$(qopts "$img")" > q.json
        /usr/bin/python3 -c '
import json, sys
q, t = (json.load(open(x)) for x in sys.argv[1:])
for k in ("image-end-offset", "total-clusters", "allocated-clusters"):
    assert q.get(k) == t.get(k), (k, q.get(k), t.get(k))' q.json t.json
        "$TOOL" map -U --json "$img" > t.json
        qemu-img map -U --output=json --object "$SEC" \
            --image-opts "$(qopts "$img")" > q.json
        /usr/bin/python3 -c '
import json, sys
q, t = (json.load(open(x)) for x in sys.argv[1:])
key = lambda m: [(e["start"], e["length"], e["data"], e["zero"]) for e in m]
assert key(q) == key(t), (key(q)[:5], key(t)[:5])' q.json t.json
    done
    # An unencrypted overlay over an encrypted base.
    cp "$BATS_FILE_TMPDIR/luks.qcow2" base.qcow2
    "$TOOL" create -q -b base.qcow2 -F qcow2 ov.qcow2
    [ "$(qemu-img info --output=json ov.qcow2 | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" = $((16 << 20)) ]
    diff <(qemu-img info --backing-chain --output=json ov.qcow2 | grep -v actual-size) \
         <("$TOOL" info --backing-chain --json ov.qcow2 | grep -v actual-size)
    # Changing metadata needs the key: --password or --password-file.
    run -1 "$TOOL" snapshot -c s1 base.qcow2
    [[ "$output" == *"a password is needed"* ]]
    run -1 "$TOOL" snapshot -c s1 --password wrong base.qcow2
    [[ "$output" == *"invalid password"* ]]
    "$TOOL" snapshot -c s1 --password "$PW" base.qcow2
    qio base.qcow2 -c 'write -P 0x99 0 64k'
    "$TOOL" snapshot --password-file "$BATS_FILE_TMPDIR/pw-nl" -a s1 base.qcow2
    qio base.qcow2 -c 'read -P 0xa1 0 1M'
    "$TOOL" snapshot -d s1 --password "$PW" base.qcow2
    qcheck base.qcow2
    # A leak (the header cluster counted twice), repaired with the key.
    /usr/bin/python3 -c '
import struct, sys
f = open(sys.argv[1], "r+b")
f.seek(48); rt = struct.unpack(">Q", f.read(8))[0]
f.seek(rt); rb = struct.unpack(">Q", f.read(8))[0]
f.seek(rb); f.write(struct.pack(">H", 2))' base.qcow2
    run -3 "$TOOL" check base.qcow2
    # Repairs touch metadata only: no key needed, but one is checked.
    run -1 "$TOOL" check -r leaks --password wrong base.qcow2
    [[ "$output" == *"invalid password"* ]]
    run -0 "$TOOL" check -r leaks base.qcow2
    qcheck base.qcow2
    qio base.qcow2 -c 'read -P 0xa1 0 1M'
}

@test "password forms: +FILE and -FD" {
    local img="$BATS_FILE_TMPDIR/luks.qcow2"
    cd "$BATS_TEST_TMPDIR"
    run -0 qemu-img convert --object "$SEC" --image-opts "$(qopts "$img")" \
        -O raw qemu.raw
    run -0 nbdkit -U - "$PLUGIN" file="$img" password=+"$BATS_FILE_TMPDIR/pw" \
        --readonly --run 'nbdcopy "$uri" a.raw'
    cmp qemu.raw a.raw
    # nbdkit drops one trailing newline of a password file.
    run -0 nbdkit -U - "$PLUGIN" file="$img" \
        password=+"$BATS_FILE_TMPDIR/pw-nl" --readonly \
        --run 'nbdcopy "$uri" b.raw'
    cmp qemu.raw b.raw
    nbdkit -U - "$PLUGIN" file="$img" password=-3 --readonly \
        --run 'nbdcopy "$uri" c.raw' 3<"$BATS_FILE_TMPDIR/pw"
    cmp qemu.raw c.raw
}

@test "missing password: nbdkit refuses to start, with a message" {
    local f
    cd "$BATS_TEST_TMPDIR"
    for f in aes luks; do
        run -1 tnbdkit -U - "$PLUGIN" \
            file="$BATS_FILE_TMPDIR/$f.qcow2" --run 'nbdcopy "$uri" -'
        [[ "$output" == *"is encrypted"*"a password is needed"* ]]
        [[ "$output" != *"Segmentation"* ]]
    done
}

@test "wrong password on LUKS: refused, never serves ciphertext" {
    local f
    cd "$BATS_TEST_TMPDIR"
    for f in luks luks-cbc luks-sha1; do
        run -1 tnbdkit -U - "$PLUGIN" \
            file="$BATS_FILE_TMPDIR/$f.qcow2" password=wrong-password \
            --run 'nbdcopy "$uri" out.raw'
        [[ "$output" == *"invalid password"* ]]
        [ ! -e out.raw ]
    done
    # A password that is a prefix of the right one is wrong too.
    run -1 tnbdkit -U - "$PLUGIN" file="$BATS_FILE_TMPDIR/luks.qcow2" \
        password="${PW%?}" --run 'true'
    [[ "$output" == *"invalid password"* ]]
}

# luks_area IMG: prints the offset of the LUKS area (FDE extension).
luks_area ()
{
    /usr/bin/python3 - "$1" <<'EOF'
import struct, sys
d = open(sys.argv[1], 'rb').read(65536)
ver = struct.unpack('>I', d[4:8])[0]
pos = struct.unpack('>I', d[100:104])[0] if ver >= 3 else 72
while True:
    t, l = struct.unpack('>II', d[pos:pos + 8])
    if t == 0x0537be77:
        print(pos, struct.unpack('>Q', d[pos + 8:pos + 16])[0])
        break
    if t == 0:
        sys.exit(1)
    pos += 8 + (l + 7) // 8 * 8
EOF
}

# poke FILE OFFSET HEXBYTES: overwrites bytes in place.
poke ()
{
    printf "$(sed 's/\(..\)/\\x\1/g' <<<"$3")" |
        dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# refused IMG TEXT: nbdkit with the right password refuses IMG, within
# 10 seconds, without crashing, saying TEXT.
refused ()
{
    run tnbdkit -U - "$PLUGIN" file="$PWD/$1" password="$PW" \
        --run 'nbdcopy "$uri" out.raw'
    echo "$output"
    [ "$status" -eq 1 ]
    [[ "$output" != *"Segmentation"* && "$output" != *"Aborted"* ]]
    [[ "$output" == *"$2"* ]]
    [ ! -e out.raw ]
}

@test "damaged LUKS header: refused with a message, quickly" {
    cd "$BATS_TEST_TMPDIR"
    local ext area
    read -r ext area < <(luks_area "$BATS_FILE_TMPDIR/luks.qcow2")

    # The LUKS magic.
    cp "$BATS_FILE_TMPDIR/luks.qcow2" a.qcow2
    poke a.qcow2 "$area" 4c554b5300
    refused a.qcow2 "LUKS header: bad magic"

    # Slot 0's stripes field (offset 208 + 44): huge, then zero.
    cp "$BATS_FILE_TMPDIR/luks.qcow2" b.qcow2
    poke b.qcow2 $((area + 252)) ffffffff
    refused b.qcow2 "key slot 0: key material"
    poke b.qcow2 $((area + 252)) 00000000
    refused b.qcow2 "key slot 0: stripes is 0"

    # Slot 0's key material: the password no longer unlocks it.
    cp "$BATS_FILE_TMPDIR/luks.qcow2" c.qcow2
    poke c.qcow2 $((area + 4096 + 100)) 0123456789abcdef
    refused c.qcow2 "invalid password"

    # The FDE extension's length: less than a LUKS header, then less than
    # the key material.
    cp "$BATS_FILE_TMPDIR/luks.qcow2" d.qcow2
    poke d.qcow2 $((ext + 16)) 0000000000000010
    refused d.qcow2 "smaller than the 592-byte phdr"
    poke d.qcow2 $((ext + 16)) 0000000000001000
    refused d.qcow2 "lies outside the 4096-byte LUKS area"

    # (Not tested: a key slot's iteration count raised to 2^32-1 makes
    # PBKDF2 run for hours, in QEMU as here; LUKS has no bound on it.)
}

@test "qcow2-tool create LUKS: opens in QEMU and the plugin" {
    cd "$BATS_TEST_TMPDIR"
    run -0 "$TOOL" create -o encrypt.format=luks,encrypt.iter-time=10 \
        --password "$PW" t.qcow2 $SIZE
    [[ "$output" == *"encrypt.format=luks"* ]]
    [[ "$output" != *"$PW"* ]]
    qcheck t.qcow2
    qio t.qcow2 "${FILL[@]}"
    qio t.qcow2 -c 'read -P 0xa1 0 1M' -c 'read -P 0xd4 15M 1M'
    qcheck t.qcow2
    cp t.qcow2 q.qcow2
    # The plugin writes; QEMU reads the same.
    start_nbdkit "$PLUGIN" file="$PWD/t.qcow2" password="$PW"
    run -0 qemu-io -f raw -d unmap "${OPS[@]}" "$uri"
    stop_nbdkit
    qio q.qcow2 "${OPS[@]}"
    qcompare t.qcow2 q.qcow2
    qcheck t.qcow2
    # Layout: the LUKS area follows the L1 table, as in QEMU's images.
    run -0 qemu-img info --output=json t.qcow2
    [[ "$output" == *'"format": "luks"'* ]]
    [[ "$output" == *'"cipher-alg": "aes-256"'* ]]
}

# luks_cases: "alg mode ivgen hash" for every cipher and mode QEMU 7.2
# makes, the IV generators and hashes in turn.  QEMU aborts on 24-byte keys but in XTS
# (their key material is not whole sectors); cast5 has 8-byte blocks:
# no XTS, and no ESSIV cipher.
luks_cases ()
{
    local alg mode n=0 ivs=(plain64 plain essiv) iv
    local hashes=(sha256 md5 sha1 sha224 sha384 sha512 ripemd160)
    for alg in aes-128 aes-256 serpent-128 serpent-192 serpent-256 \
               twofish-128 twofish-192 twofish-256 cast5-128; do
        for mode in ecb cbc ctr xts; do
            case $alg in
            *-192) [ $mode = xts ] || continue ;;
            cast5-*) [ $mode != xts ] || continue ;;
            esac
            iv=${ivs[$((n % 3))]}
            [ $alg != cast5-128 ] || [ $iv != essiv ] || iv=plain
            echo "$alg $mode $iv ${hashes[$((n++ % 7))]}"
        done
    done
}

# luks_plugin_rw IMG: through the plugin, 70000 bytes of 0x07 at 1000
# read back, and 5000 bytes of 0x09 go to 300000.  (--run: stopping a
# daemonized nbdkit costs a second or two.)
luks_plugin_rw ()
{
    run nbdkit -U - "$PLUGIN" file="$1" password="$PW" --run 'nbdsh -u "$uri" -c "
assert h.pread(70000, 1000) == b\"\\x07\" * 70000
assert h.pread(1000, 0) == bytes(1000)
h.pwrite(b\"\\x09\" * 5000, 300000)
h.flush()
print(\"RW-OK\")"'
    [[ "$output" == *RW-OK* ]]
}

@test "LUKS with every cipher (aes, serpent, twofish, cast5), mode (ecb, cbc, ctr, xts), IV generator and hash: images qcow2-tool makes open in QEMU, and the plugin reads and writes them as QEMU does" {
    cd "$BATS_TEST_TMPDIR"
    local alg mode iv hash n=0
    while read -r alg mode iv hash; do
        rm -f t.qcow2
        "$TOOL" create -q -o encrypt.format=luks,encrypt.cipher-alg=$alg,encrypt.cipher-mode=$mode,encrypt.ivgen-alg=$iv,encrypt.hash-alg=$hash,encrypt.iter=1000 \
            --object "$SEC" -o encrypt.key-secret=sec0 t.qcow2 4M
        run -0 qemu-img info --output=json t.qcow2
        [[ "$output" == *"\"cipher-alg\": \"$alg\""* &&
           "$output" == *"\"cipher-mode\": \"$mode\""* &&
           "$output" == *"\"hash-alg\": \"$hash\""* ]] ||
            { echo "$alg $mode $iv $hash: $output" >&3; return 1; }
        qio t.qcow2 -c 'write -P 7 1000 70000'
        luks_plugin_rw "$PWD/t.qcow2" || { echo "$alg $mode $iv: $output" >&3; return 1; }
        qio t.qcow2 -c 'read -P 9 300000 5000' -c 'read -P 7 1000 70000'
        qcheck t.qcow2
        n=$((n + 1))
    done < <(luks_cases)
    [ "$n" -eq 29 ]
}

@test "LUKS images QEMU makes with serpent, twofish and cast5, with ecb and ctr, and with md5, sha224 and ripemd160: the plugin reads and writes them as QEMU does" {
    cd "$BATS_TEST_TMPDIR"
    local alg mode iv hash ivhash
    # QEMU's PBKDF2 calibration costs 2-5 s per image: a cover of the
    # new ciphers, modes and hashes (the test above has every
    # combination, made by qcow2-tool and checked by QEMU).
    for v in "aes-256 ctr essiv sha224 md5" "serpent-128 cbc plain ripemd160 sha256" \
             "twofish-256 ecb essiv sha384 sha256" "cast5-128 ctr plain md5 sha256"; do
        read -r alg mode iv hash ivhash <<<"$v"
        rm -f t.qcow2
        qcreate -o "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=$alg,encrypt.cipher-mode=$mode,encrypt.ivgen-alg=$iv,encrypt.ivgen-hash-alg=$ivhash,encrypt.hash-alg=$hash,encrypt.iter-time=200" \
            t.qcow2 4M
        qio t.qcow2 -c 'write -P 7 1000 70000'
        luks_plugin_rw "$PWD/t.qcow2" || { echo "$alg $mode $iv: $output" >&3; return 1; }
        qio t.qcow2 -c 'read -P 9 300000 5000' -c 'read -P 7 1000 70000'
    done
}

@test "qcow2-tool create LUKS variants: QEMU agrees on the parameters" {
    cd "$BATS_TEST_TMPDIR"
    local v alg mode ivgen hash
    for v in "aes-128 cbc essiv sha256" "aes-256 cbc plain64 sha512" \
             "aes-192 xts plain sha1" "aes-128 xts plain64 sha384"; do
        read -r alg mode ivgen hash <<<"$v"
        rm -f t.qcow2
        "$TOOL" create -q -o encrypt.format=luks,encrypt.cipher-alg=$alg,encrypt.cipher-mode=$mode,encrypt.ivgen-alg=$ivgen,encrypt.hash-alg=$hash,encrypt.iter=1000 \
            --object "$SEC" -o encrypt.key-secret=sec0 t.qcow2 4M
        run -0 qemu-img info --output=json t.qcow2
        [[ "$output" == *"\"cipher-alg\": \"$alg\""* ]]
        [[ "$output" == *"\"cipher-mode\": \"$mode\""* ]]
        [[ "$output" == *"\"ivgen-alg\": \"$ivgen\""* ]]
        [[ "$output" == *"\"hash-alg\": \"$hash\""* ]]
        [[ "$output" == *'"iters": 1000,'* ]]
        qio t.qcow2 -c 'write -P 0x5c 1000 70000' -c 'read -P 0x5c 1000 70000'
        qcheck t.qcow2
        run -0 nbdkit -U - "$PLUGIN" file="$PWD/t.qcow2" password="$PW" \
            --run 'nbdcopy "$uri" p.raw'
        qemu-img convert --object "$SEC" --image-opts "$(qopts t.qcow2)" \
            -O raw q.raw
        cmp p.raw q.raw
    done
}

@test "qcow2-tool create AES, compat=0.10 LUKS, password file, prealloc full" {
    cd "$BATS_TEST_TMPDIR"
    run -0 "$TOOL" create -q -o encrypt.format=aes \
        --password-file "$BATS_FILE_TMPDIR/pw-nl" a.qcow2 $SIZE
    qcheck a.qcow2
    qio a.qcow2 "${FILL[@]}"
    qcheck a.qcow2
    run -0 nbdkit -U - "$PLUGIN" file="$PWD/a.qcow2" password="$PW" \
        --run 'nbdcopy "$uri" p.raw'
    qemu-img convert --object "$SEC" --image-opts "$(qopts a.qcow2)" -O raw q.raw
    cmp p.raw q.raw
    # -o encryption=on is the deprecated spelling of encrypt.format=aes.
    run -0 "$TOOL" create -q -o encryption=on --password "$PW" a2.qcow2 1M
    run -0 qemu-img info a2.qcow2
    [[ "$output" == *"format: aes"* ]]

    # QEMU 7.2 creates LUKS in version 2 images too.
    run -0 "$TOOL" create -q -o compat=0.10,encrypt.format=luks,encrypt.iter=1000 \
        --password "$PW" v2.qcow2 4M
    qio v2.qcow2 -c 'write -P 0x3c 0 1M' -c 'read -P 0x3c 0 1M'
    qcheck v2.qcow2
    run -0 nbdkit -U - "$PLUGIN" file="$PWD/v2.qcow2" password="$PW" \
        --run 'nbdcopy "$uri" v2.raw'
    cmp -n 1M v2.raw <(head -c 1M /dev/zero | tr '\0' '<')

    # preallocation=full writes encrypted zeros: QEMU and the plugin read
    # zeros.
    local f
    for f in aes luks; do
        run -0 "$TOOL" create -q -o encrypt.format=$f,preallocation=full \
            $([ $f = luks ] && echo -o encrypt.iter=1000) \
            --password "$PW" pf.qcow2 2M
        qcheck pf.qcow2
        qio pf.qcow2 -c 'read -P 0 0 2M'
        run -0 nbdkit -U - "$PLUGIN" file="$PWD/pf.qcow2" password="$PW" \
            --run 'nbdcopy "$uri" pf.raw'
        cmp pf.raw <(head -c 2M /dev/zero)
    done
}

@test "qcow2-tool create: refuses what QEMU refuses, and prealloc without data" {
    cd "$BATS_TEST_TMPDIR"
    run -1 "$TOOL" create -q -o encrypt.format=luks t.qcow2 1M
    [[ "$output" == *"'encrypt.key-secret' is required"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=aes,encrypt.cipher-alg=aes-256 \
        --password x t.qcow2 1M
    [[ "$output" == *"'encrypt.cipher-alg' is unexpected"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=foo --password x t.qcow2 1M
    [[ "$output" == *"does not accept value 'foo'"* ]]
    run -1 "$TOOL" create -q -o encrypt.key-secret=sec0 --object "$SEC" \
        t.qcow2 1M
    [[ "$output" == *"'encrypt.format' is missing"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=luks,encrypt.key-secret=sec1 \
        --object "$SEC" t.qcow2 1M
    [[ "$output" == *"No secret with id 'sec1'"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=luks,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1 \
        --password x t.qcow2 1M
    [[ "$output" == *"No AES cipher with key size 20"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=luks,encrypt.cipher-alg=sm4 \
        --password x t.qcow2 1M
    [[ "$output" == *"not supported"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=luks,encrypt.cipher-alg=cast5-128 \
        --password x t.qcow2 1M
    [[ "$output" == *"Unsupported cipher mode xts"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=luks,encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv \
        --password x t.qcow2 1M
    [[ "$output" == *"not supported with essiv"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=luks,encrypt.cipher-alg=aes-192,encrypt.cipher-mode=cbc \
        --password x t.qcow2 1M
    [[ "$output" == *"not supported"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=luks,preallocation=metadata \
        --password x t.qcow2 1M
    [[ "$output" == *"preallocation=metadata cannot be used with encryption"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=aes,preallocation=falloc \
        --password x t.qcow2 1M
    [[ "$output" == *"preallocation=falloc cannot be used"* ]]
    run -1 "$TOOL" create -q -o encrypt.format=luks,encrypt.iter=0 \
        --password x t.qcow2 1M
    [ ! -e t.qcow2 ]
}

@test "qcow2-tool info: encryption parameters as qemu-img shows them, no password" {
    local f
    cd "$BATS_TEST_TMPDIR"
    for f in aes luks luks-cbc luks-sha1; do
        "$TOOL" info --json "$BATS_FILE_TMPDIR/$f.qcow2" >tool.json
        qemu-img info --output=json "$BATS_FILE_TMPDIR/$f.qcow2" >qemu.json
        run -0 /usr/bin/python3 -c '
import json, sys
t = json.load(open("tool.json")); q = json.load(open("qemu.json"))
te = t["format-specific"]["data"]["encrypt"]
qe = q["format-specific"]["data"]["encrypt"]
assert te == qe, (te, qe)
assert t["encrypted"] is True
'
        # The text form: the same lines as qemu-img in the encrypt block.
        diff <("$TOOL" info "$BATS_FILE_TMPDIR/$f.qcow2" |
                   sed -n '/^encrypted/p; /encrypt:/,/master key iters\|format: aes/p') \
             <(qemu-img info "$BATS_FILE_TMPDIR/$f.qcow2" |
                   sed -n '/^encrypted/p; /encrypt:/,/master key iters\|format: aes/p')
    done
    run -0 "$TOOL" info "$BATS_FILE_TMPDIR/luks-cbc.qcow2"
    [[ "$output" == *"cipher alg: aes-128"* ]]
    [[ "$output" == *"cipher mode: cbc"* ]]
    [[ "$output" == *"ivgen alg: essiv"* ]]
    [[ "$output" == *"ivgen hash alg: sha256"* ]]
    [[ "$output" != *"$PW"* ]]
    # A damaged LUKS header is an error, not a crash.
    cp "$BATS_FILE_TMPDIR/luks.qcow2" bad.qcow2
    read -r _ area < <(luks_area bad.qcow2)
    poke bad.qcow2 "$area" 00000000
    run -1 "$TOOL" info bad.qcow2
    [[ "$output" == *"not in LUKS format"* ]]
}

@test "--dump-plugin shows qcow2_encryption" {
    run -0 nbdkit "$PLUGIN" --dump-plugin
    [[ "$output" == *"qcow2_encryption=aes,luks"* ]]
}
