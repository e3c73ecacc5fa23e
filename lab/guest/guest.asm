; mtunnel lab guest: a boot sector that keeps dirtying memory (and, with -DDISK, its disk).
;
; Build: nasm -f bin -o guest.bin guest.asm            (lab.sh pads it into a raw disk image)
;        nasm -f bin -DIDLE -o guest-idle.bin guest.asm (writes the RAM pattern once, halts)
;        nasm -f bin -DDISK -o guest-disk.bin guest.asm (also writes its disk, see below;
;                                     1 KiB: pad it to a disk of more than 1 MiB, e.g. 32 MiB)
;        nasm -f bin -DHOT -o guest-hot.bin guest.asm   (rewrites a working set at a set rate,
;                                     see "Hot variant" below; several sectors, padded likewise)
;
; Design
;   SeaBIOS loads this sector to 0x7c00 and jumps to it in real mode. We
;   1. disable interrupts (nothing ever needs them again; we never return to the BIOS),
;   2. enable A20 (BIOS int 15h/2401, then the "fast A20" bit of port 0x92) so that
;      addresses >= 1 MiB do not wrap to 0,
;   3. read the RAM size from CMOS while still in real mode:
;        0x34/0x35 = RAM above 16 MiB in 64 KiB units -> ram_end = 16 MiB + n * 64 KiB
;        fallback if that is 0 (guest <= 16 MiB): 0x30/0x31 = KiB above 1 MiB
;      (QEMU caps 0x34/0x35 at 0xffff, i.e. it describes memory below 4 GiB only;
;      for the lab's guests of a few hundred MiB that is all RAM),
;   4. load a flat GDT (4 GiB code + data segments) and enter 32-bit protected mode,
;   5. set byte 0 of every page >= 1 MiB to 1 (SeaBIOS left tables at the top of RAM;
;      and a non-zero page is a real page to migrate, not QEMU's cheap zero page),
;   6. publish a status block at 0x500 (read by `guest-check --wait` with HMP xp):
;        0x500 dword "MTLG"   the loop runs     0x504 dword  completed passes
;        0x508 dword ram_end
;   7. loop forever over every 4 KiB page from 1 MiB up to ram_end:
;        inc byte [page]            ; byte 0 of the page
;        busy-wait DELAY TSC ticks  ; rdtsc-based, ~100k ticks/page
;      At ~2.4 GHz that is ~24k pages/s (~100 MiB/s dirtied): the guest keeps
;      dirtying memory during a migration but the migration still converges.
;
; Invariant checked by lab/guest-check after a migration: byte 0 of the pages
; [1 MiB, k) hold v+1 and pages [k, ram_end) hold v (mod 256) for a single k -
; the position of the loop when the VM stopped. Any lost or stale page breaks it.
; Everything the code touches (code, GDT, stack, sector buffer) lives below 1 MiB.
;
; Disk variant (-DDISK): the same RAM loop, plus one disk sector written every
; DEVERY pages to the IDE primary master (the boot disk), ATA PIO LBA28 WRITE
; SECTORS with nIEN set and status polling (interrupts stay off), the data with rep
; outsd (QEMU's IDE takes 32-bit PIO). A status poll gives up after POLLS reads, not
; after a time: a paused VM must not look like a hung drive. Its code does not
; fit in the boot sector: the boot sector loads sectors 1..DSECTS of the boot disk
; (the image is 512 * (1 + DSECTS) bytes) to 0x7e00 with BIOS int 13h before
; protected mode. Before step 6 it asks IDENTIFY DEVICE for the disk size N
; (words 60-61) and publishes
;        0x50C dword "MTLD"   disk mode         0x510 dword pass p (from 1)
;        0x514 dword next sector k              0x518 dword N (disk sectors)
;        0x51C dword error: 0 ok; else ATA status SS of the failed command in the
;              low byte, 0x1SS timeout (BSY never cleared), 0x2SS no DRQ,
;              +0x400 if IDENTIFY failed, 0x800 disk has no sector >= DSTART,
;              0x1000 int 13h did not load the disk code.
;              After an error the disk is no longer written; the RAM loop goes on.
; Sectors [DSTART = 2048 (1 MiB), N) are written in order; sector s of pass p holds
;   dword 0 = p, dword 1 = s, dword 2 = "MTLD", dwords 3..127 = (p rol 16) xor s.
; Per sector: write it, poll until the drive is done, only THEN advance k (at N:
; k = DSTART, p + 1); p and k change in one 8-byte store (cmpxchg8b), so a stopped
; VM never shows one without the other.
; Disk invariant checked by guest-check: sectors [DSTART, k) hold pass p, sectors
; (k, N) hold pass p-1 (zeros for pass 0), sector k either - the VM may stop
; between a completed write and the advance of k. A lost write breaks it.
;   The write runs inside a page's DELAY, so where it is cheaper than DELAY the RAM
; loop keeps its ~24k pages/s and the disk gets 1/DEVERY of that: ~6000 sectors/s,
; ~3 MB/s. Each write is ~140 port accesses (128 of them the 32-bit data port), i.e.
; that many VM exits, so the rate is whatever the host's exits allow. Measured with
; a 32 MiB disk: TCG ~4400-5000 sectors/s (2.2-2.6 MB/s); the lab machine's KVM
; (kvm-pvm, nested, which emulates this unpaged guest) ~750 sectors/s (0.38 MB/s),
; and the RAM loop follows at 4 pages per sector (~3000 pages/s).
;
; Hot variant (-DHOT): dirties memory at a set rate, in real time, for post-copy tests
; (pre-copy at a bandwidth below the rate never converges). Steps 1-5 as above (every
; page >= 1 MiB holds 1), then, in code loaded like the disk variant's:
;   - W (MiB) and R (MiB/s) from the fw_cfg file "opt/mtunnel/hot", the string "W:R"
;     (lab/qm: VM config "hot: W:R" -> -fw_cfg name=opt/mtunnel/hot,string=W:R), read
;     through the I/O ports (selector 0x510, data 0x511; the file directory at key 0x19).
;     No fw_cfg file: W = 64, R = 64. W 1..65535, R 0..1000000; R = 0: unpaced.
;   - the TSC calibrated against the PIT: channel 2 counts CAL_LATCH cycles (50 ms)
;     gated through port 0x61 until OUT2 rises; the median of three runs (a vCPU
;     preempted during one run does not count).
;   - loop forever over the working set, the pages [1 MiB, 1 MiB + W MiB) (at most up
;     to ram_end): each page rewritten whole, every byte set to byte 0's next value
;     (xbzrle cannot send it for less than a page; 1024 stores, which the nested KVM
;     here emulates at ~12 MiB/s: post-copy runs use "accel: tcg", ~740 MiB/s
;     unpaced), at R * 256 pages/s, paced by TSC deadlines (one
;     page every kHz * 1000 / (R * 256) ticks). A vCPU that falls behind writes as fast
;     as it can; the schedule never lags more than SLACK_MS, so after a stall the loop
;     does not burst to catch up. Pages from 1 MiB + W MiB on keep their 1.
;   - every gap between two consecutive page writes (TSC after each write) is a stall
;     candidate: without stalls a gap is the pacing interval 1 / (R * 256) s (122 us at
;     32 MiB/s); a post-copy page fault, the switch-over pause of a migration (the
;     TSC runs on from source stop to target resume here), a preempted vCPU, or
;     dirty-logging faults show as longer gaps.
;   Its status block (after "MTLG" at 0x500 and the pass count at 0x504, which counts
;   completed passes over the working set; 0x50C..0x51C stay 0):
;        0x520 dword "MTLH"   hot mode (set with the rest, just before "MTLG")
;        0x524 dword end of the working set (address, exclusive): 1 MiB + W MiB, or
;              ram_end if W MiB did not fit
;        0x528 dword R as set, MiB/s (0: unpaced)
;        0x52C dword TSC kHz as calibrated
;        0x530 dword flags: 1 W:R read from fw_cfg; 2 the file was malformed (defaults
;              used); 4 W clamped to RAM; 8 no fw_cfg; 0x10 PIT calibration failed
;              (2 GHz assumed); 0x1000 int 13h did not load the hot code (halted)
;        0x534 dword achieved rate of the last completed pass, KiB/s (0 before one)
;        0x538 dword longest gap between two page writes since the loop started, us
;        0x53C dword W as configured, MiB
;        0x540 16 dwords: longest gap of pass p at 0x540 + 4 * (p mod 16), us; the
;              current pass (p = [0x504]) updated live, its slot zeroed when it
;              begins (before the count moves on): the last 15 completed passes and
;              the running one can be read, e.g. before and after a migration.
;   All values are 32 bit, microseconds saturate at 0xffffffff. Invariant checked by
;   guest-check: the working set follows the v / v+1 step rule, every page after it
;   holds 1.

DELAY       equ 100000          ; TSC ticks between two pages
INFO        equ 0x500           ; status block (free memory after the BIOS data area)
MAGIC       equ 0x474c544d      ; "MTLG" as a little-endian dword
START       equ 0x100000        ; first page dirtied: 1 MiB
PAGE        equ 4096
%ifdef HOT
%ifdef IDLE
%error "HOT and IDLE do not combine"
%endif
%ifdef DISK
%error "HOT and DISK do not combine"
%endif
%define EXTRA                   ; code in sectors 1..DSECTS, loaded by the boot sector
HMAGIC      equ 0x484c544d      ; "MTLH"
HOT_W       equ 64              ; default working set, MiB (no fw_cfg file)
HOT_R       equ 64              ; default rate, MiB/s
FW_SEL      equ 0x510           ; fw_cfg selector port (16 bit)
FW_DATA     equ 0x511           ; fw_cfg data port (8 bit)
FW_DIR      equ 0x19            ; fw_cfg key of the file directory
CAL_LATCH   equ 59659           ; PIT cycles of one calibration: 50.0 ms at 1193182 Hz
CAL_POLLS   equ 1 << 24         ; port 0x61 reads before a calibration counts as failed
CAL_KHZ     equ 2000000         ; TSC kHz assumed when the calibration failed
SLACK_MS    equ 2               ; most the pacing catches up after a stall, ms
BUF         equ 0x1000          ; fw_cfg directory entry, then the file's contents
%endif
%ifdef DISK
%ifdef IDLE
%error "DISK and IDLE do not combine"
%endif
%define EXTRA
DMAGIC      equ 0x444c544d      ; "MTLD"
DSTART      equ 2048            ; first sector written: 1 MiB, far from the boot sector
DEVERY      equ 4               ; RAM pages per disk sector written
BUF         equ 0x1000          ; one sector (IDENTIFY data, then each sector written)
ATA         equ 0x1f0           ; primary IDE command block
ATA_CTL     equ 0x3f6           ; primary IDE device control
POLLS       equ 1 << 26         ; status reads before a command counts as hung
%endif

        bits 16
        org 0x7c00

start:
        cli
        cld
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        jmp 0:.cs0                  ; normalise CS:IP (some BIOSes jump to 07c0:0000)
.cs0:
%ifdef EXTRA
        mov [bootdrv], dl           ; the BIOS passes the boot drive in dl
%endif
        ; --- A20: ask the BIOS, then set the fast A20 gate (bit 1 of port 0x92,
        ;     never touching bit 0 = reset)
        mov ax, 0x2401
        int 0x15
        cli
        in al, 0x92
        or al, 2
        and al, 0xfe
        out 0x92, al

        ; --- RAM size from CMOS (bit 7 of the index keeps NMI disabled)
        mov al, 0x35 | 0x80
        out 0x70, al
        in al, 0x71
        mov ah, al
        mov al, 0x34 | 0x80
        out 0x70, al
        in al, 0x71
        mov [ram64k], ax
        mov al, 0x31 | 0x80
        out 0x70, al
        in al, 0x71
        mov ah, al
        mov al, 0x30 | 0x80
        out 0x70, al
        in al, 0x71
        mov [extkb], ax

%ifdef EXTRA
        ; --- the disk (hot) code: sectors 1..DSECTS (CHS 0/0/2..) to 0x7e00, right behind us
        mov ax, 0x0200 + DSECTS
        mov cx, 2
        xor dh, dh
        mov dl, [bootdrv]
        mov bx, 0x7e00
        int 0x13                    ; on failure disk_sig stays wrong: checked later
        cli
%endif

        ; --- protected mode
        lgdt [gdt_desc]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        jmp 0x08:pm32

        bits 32
pm32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov esp, 0x7c00

        ; ebp = ram_end
        movzx eax, word [ram64k]
        test eax, eax
        jz .small
        shl eax, 16                 ; * 64 KiB
        add eax, 0x1000000          ; + 16 MiB
        jmp .have
.small:
        movzx eax, word [extkb]
        shl eax, 10                 ; * 1 KiB
        add eax, START              ; + 1 MiB
.have:
        and eax, ~(PAGE - 1)
        mov ebp, eax
        mov dword [INFO + 8], eax
        mov dword [INFO + 4], 0

        ; set byte 0 of every page to 1 first: SeaBIOS leaves tables (ACPI, its
        ; high zone) at the top of RAM, whose first bytes would break the pattern,
        ; and all-zero pages would migrate as zero pages instead of real data
        mov edi, START
.clear:
        mov byte [edi], 1
        add edi, PAGE
        cmp edi, ebp
        jb .clear
%ifdef DISK
        cmp dword [disk_sig], DMAGIC
        je .loaded
        mov edi, INFO + 0x0c        ; int 13h failed: report it, never write
        mov eax, DMAGIC
        stosd
        xor eax, eax
        stosd
        stosd
        stosd
        mov ah, 0x10
        stosd
        jmp .hooked
.loaded:
        call disk_init
.hooked:
        mov esi, DEVERY
%endif
%ifdef HOT
        cmp dword [hot_sig], HMAGIC
        je hot_main                 ; never returns
        mov dword [INFO + 0x20], HMAGIC
        mov dword [INFO + 0x30], 0x1000 ; int 13h failed: the hot code is missing
        mov dword [INFO], MAGIC
.dead:
        hlt
        jmp .dead
%endif
        mov dword [INFO], MAGIC     ; now the loop runs
%ifdef IDLE
        ; idle variant (nasm -DIDLE): the pattern is written once, then the vCPU halts
        ; with interrupts off, so dozens of guests can migrate at once on two cores
.idle:
        hlt
        jmp .idle
%endif

        jmp .first

.pass:
        inc dword [INFO + 4]        ; one more pass completed
.first:
        mov edi, START
.page:
        cmp edi, ebp
        jae .pass                   ; wrapped: start the next pass
        inc byte [edi]
        rdtsc
        mov ebx, eax
%ifdef DISK
        ; the write runs inside this page's delay: where it costs less than
        ; DELAY the RAM loop keeps its pace
        dec esi
        jnz .wait
        mov esi, DEVERY
        cmp dword [INFO + 0x1c], 0
        jne .wait                   ; a command failed: stop writing
        call disk_write
%endif
.wait:
        pause
        rdtsc
        sub eax, ebx                ; low 32 bits; unsigned difference survives wrap
        cmp eax, DELAY
        jb .wait
        add edi, PAGE
        jmp .page

        align 8
gdt:
        dq 0                        ; null
        dq 0x00cf9a000000ffff       ; 0x08: code, base 0, limit 4 GiB, 32-bit
        dq 0x00cf92000000ffff       ; 0x10: data, base 0, limit 4 GiB
gdt_end:
gdt_desc:
        dw gdt_end - gdt - 1
        dd gdt

ram64k: dw 0
extkb:  dw 0

%ifdef EXTRA
bootdrv: db 0
%endif

        times 510 - ($ - $$) db 0
        dw 0xaa55

%ifdef DISK
; --- sectors 1..DSECTS of the boot disk, loaded to 0x7e00 by the boot sector
disk_sig:
        dd DMAGIC                   ; checked before the first call: the load worked

; Disk mode on: nIEN, size from IDENTIFY DEVICE, the first position (pass 1),
; then "MTLD" at 0x50C. Clobbers eax, ecx, edx, edi.
disk_init:
        mov dx, ATA_CTL
        mov al, 2                   ; nIEN: the drive raises no interrupts, we poll
        out dx, al
        mov edi, INFO + 0x10
        mov eax, 1
        stosd                       ; 0x510 pass 1
        mov eax, DSTART
        stosd                       ; 0x514 next sector
        xor eax, eax
        stosd                       ; 0x518 N, until IDENTIFY answered
        stosd                       ; 0x51C no error
        mov ah, 4                   ; error code: IDENTIFY
        call ata_idle
        jc .err
        mov dl, 0xf6                ; dx = 0x1f6: master, LBA
        mov al, 0xe0
        out dx, al
        inc dx
        mov al, 0xec                ; IDENTIFY DEVICE
        out dx, al
        call ata_idle
        jc .err
        test al, 8                  ; DRQ: the data is ready
        jz .nodrq
        mov dl, 0xf0
        mov edi, BUF
        mov ecx, 256
        rep insw
        mov eax, [BUF + 120]        ; words 60-61: LBA28 sectors
        mov [INFO + 0x18], eax
        cmp eax, DSTART
        ja .ok
        mov eax, 0x800              ; no sector to write
        jmp .set
.nodrq:
        or ah, 2
.err:
        movzx eax, ax
.set:
        mov [INFO + 0x1c], eax
.ok:
        mov dword [INFO + 0x0c], DMAGIC
        ret

; Write sector k with pass p, then advance (k, p). Keeps all registers.
disk_write:
        pushad
        mov ebx, [INFO + 0x10]      ; p
        mov esi, [INFO + 0x14]      ; s = k
        mov edi, BUF
        mov eax, ebx
        stosd
        mov eax, esi
        stosd
        mov eax, DMAGIC
        stosd
        mov eax, ebx
        rol eax, 16
        xor eax, esi
        mov ecx, 125
        rep stosd
        xor ah, ah                  ; error code: write
        call ata_idle
        jc .fail
        mov dl, 0xf6
        mov eax, esi
        shr eax, 24
        or al, 0xe0                 ; master, LBA, bits 24-27
        out dx, al
        mov dl, 0xf2
        mov al, 1                   ; one sector
        out dx, al
        mov eax, esi
        inc dx                      ; 0x1f3..0x1f5: LBA bits 0-23
        out dx, al
        shr eax, 8
        inc dx
        out dx, al
        shr eax, 8
        inc dx
        out dx, al
        mov dl, 0xf7
        mov al, 0x30                ; WRITE SECTORS
        out dx, al
        xor ah, ah
        call ata_idle
        jc .fail
        test al, 8
        jz .nodrq                   ; the drive wants no data: refused
        mov dl, 0xf0
        mov esi, BUF
        mov ecx, 128
        rep outsd                   ; 32-bit PIO: half the exits of outsw
        call ata_idle               ; ah is still 0
        jc .fail
        ; advance only now: the write is complete
        mov eax, [INFO + 0x10]      ; edx:eax = the pair (k, p) as it is
        mov edx, [INFO + 0x14]
        mov ebx, eax                ; ecx:ebx = the next pair
        lea ecx, [edx + 1]
        cmp ecx, [INFO + 0x18]
        jb .same
        mov ecx, DSTART             ; wrapped: next pass
        inc ebx
.same:
        cmpxchg8b [INFO + 0x10]     ; p and k in one store (no MMX: KVM's emulator lacks it)
        popad
        ret
.nodrq:
        or ah, 2
.fail:
        movzx eax, ax
        mov [INFO + 0x1c], eax
        popad
        ret

; Poll until the drive is not busy. Out: al = status, dx = 0x1f7; carry set (and
; ah |= 1 on a timeout) if it stayed busy for POLLS reads or reports ERR or DF.
; Counts reads, not time: a paused VM must not look like a hung drive.
ata_idle:
        mov dx, ATA + 7
        mov ecx, POLLS
.poll:
        in al, dx
        test al, 0x80               ; BSY
        jz .idle
        loop .poll
        or ah, 1
        stc
        ret
.idle:
        test al, 0x21               ; ERR | DF (test clears carry)
        jz .done
        stc
.done:
        ret

%endif

%ifdef HOT
; --- sectors 1..DSECTS of the boot disk, loaded to 0x7e00 by the boot sector
hot_sig:
        dd HMAGIC                   ; checked before the jump: the load worked

; In: ebp = ram_end, every page >= 1 MiB holds 1. Reads W:R from fw_cfg, calibrates the
; TSC, publishes the hot block (0x520..0x57F), then runs the paced loop. Never returns.
hot_main:
        mov edi, INFO + 0x20
        xor eax, eax
        mov ecx, 0x60 / 4
        rep stosd
        mov dword [hot_w], HOT_W
        mov dword [hot_r], HOT_R
        call fw_config
        ; the working set: [1 MiB, 1 MiB + W MiB), at most up to ram_end
        mov ecx, [hot_w]
        mov [INFO + 0x3c], ecx
        mov eax, ebp
        sub eax, START
        shr eax, 20                 ; whole MiB above 1 MiB
        mov ebx, ebp
        cmp ecx, eax
        jbe .fits
        or dword [INFO + 0x30], 4   ; clamped to RAM
        jmp .end
.fits:
        mov ebx, ecx
        shl ebx, 20
        add ebx, START
.end:
        mov [INFO + 0x24], ebx
        push ebx
        mov eax, [hot_r]
        mov [INFO + 0x28], eax
        call calibrate
        mov [INFO + 0x2c], eax
        mov ecx, SLACK_MS
        mul ecx
        mov [h_slack], eax          ; SLACK_MS in ticks
        ; ticks per page: kHz * 1000 / (R * 256); 0 (unpaced) for R = 0
        mov ecx, [hot_r]
        test ecx, ecx
        jz .paced
        shl ecx, 8
        mov eax, [INFO + 0x2c]
        mov edx, 1000
        mul edx
        div ecx                     ; edx (<= 1) < ecx: no overflow
        mov [h_interval], eax
.paced:
        pop ebp                     ; ebp = end of the working set from now on
        mov dword [INFO + 0x20], HMAGIC

        rdtsc
        mov [h_last], eax
        mov [h_last + 4], edx
        mov [h_deadline], eax
        mov [h_deadline + 4], edx
        mov [h_pstart], eax
        mov [h_pstart + 4], edx
        mov dword [INFO], MAGIC     ; now the loop runs
.pass:
        mov edi, START
.page:
        cmp dword [h_interval], 0
        je .write
.wait:
        rdtsc
        sub eax, [h_deadline]
        sbb edx, [h_deadline + 4]
        jns .due                    ; now >= deadline
        pause
        jmp .wait
.due:
        ; edx:eax = how late; beyond the slack the schedule moves on (now - slack):
        ; after a stall the loop catches up SLACK_MS at most, never a burst
        test edx, edx
        jnz .late
        cmp eax, [h_slack]
        jbe .write
.late:
        sub eax, [h_slack]
        sbb edx, 0
        add [h_deadline], eax
        adc [h_deadline + 4], edx
.write:
        ; the whole page gets byte 0's next value: every byte changes, so no delta
        ; encoding (xbzrle, which PVE turns on) sends it cheaper than the page itself,
        ; as with a database's pages
        movzx eax, byte [edi]
        inc al
        imul eax, eax, 0x01010101
        push edi
        mov ecx, PAGE / 4
        rep stosd
        pop edi
        rdtsc
        mov ecx, eax
        mov ebx, edx
        sub eax, [h_last]
        sbb edx, [h_last + 4]       ; edx:eax = the gap since the previous write
        mov [h_last], ecx
        mov [h_last + 4], ebx
        cmp edx, [h_cmax + 4]
        jb .next
        ja .longer
        cmp eax, [h_cmax]
        jbe .next
.longer:
        mov [h_cmax], eax
        mov [h_cmax + 4], edx
        call to_us
        mov edx, [INFO + 4]
        and edx, 15
        mov [INFO + 0x40 + edx * 4], eax ; longest of this pass
        cmp eax, [INFO + 0x38]
        jbe .next
        mov [INFO + 0x38], eax      ; longest since the loop started
.next:
        mov eax, [h_interval]
        add [h_deadline], eax
        adc dword [h_deadline + 4], 0
        add edi, PAGE
        cmp edi, ebp
        jb .page
        ; a pass completed: its rate, then the next pass's slot, then the counter
        mov eax, [h_last]
        mov edx, [h_last + 4]
        mov ecx, eax
        mov ebx, edx
        sub eax, [h_pstart]
        sbb edx, [h_pstart + 4]
        mov [h_pstart], ecx
        mov [h_pstart + 4], ebx
        call to_us                  ; the pass's duration
        mov ecx, eax
        test ecx, ecx
        jnz .dur
        inc ecx
.dur:
        mov eax, ebp
        sub eax, START
        shr eax, 10                 ; KiB per pass
        mov edx, 1000000
        mul edx
        call div_sat
        mov [INFO + 0x34], eax      ; KiB/s
        xor eax, eax
        mov [h_cmax], eax
        mov [h_cmax + 4], eax
        mov edx, [INFO + 4]
        inc edx
        and edx, 15
        mov [INFO + 0x40 + edx * 4], eax
        inc dword [INFO + 4]
        jmp .pass

; eax = edx:eax / ecx, 0xffffffff if the quotient does not fit; clobbers edx
div_sat:
        cmp edx, ecx
        jae .sat
        div ecx
        ret
.sat:
        mov eax, -1
        ret

; eax = edx:eax TSC ticks in microseconds (ticks * 1000 / kHz), 0xffffffff at most;
; clobbers edx
to_us:
        push ebx
        push ecx
        mov ecx, 1000
        mov ebx, eax
        mov eax, edx
        mul ecx                     ; high dword * 1000
        test edx, edx
        jnz .sat
        xchg eax, ebx
        mul ecx                     ; low dword * 1000
        add edx, ebx
        jc .sat
        mov ecx, [INFO + 0x2c]
        call div_sat
        jmp .out
.sat:
        mov eax, -1
.out:
        pop ecx
        pop ebx
        ret

; hot_w, hot_r from the fw_cfg file opt/mtunnel/hot ("W:R", decimal); flags at 0x530:
; 1 read, 2 malformed (defaults kept), 8 no fw_cfg. Clobbers eax..edi except ebp.
fw_config:
        xor eax, eax                ; key 0: the signature
        call fw_select
        mov edi, BUF
        mov ecx, 4
        call fw_read
        cmp dword [BUF], 0x554d4551 ; "QEMU"
        je .present
        or dword [INFO + 0x30], 8
        ret
.present:
        mov ax, FW_DIR
        call fw_select
        mov edi, BUF
        mov ecx, 4
        call fw_read
        mov ebx, [BUF]
        bswap ebx                   ; number of files (big-endian)
.entry:
        test ebx, ebx
        jz .none                    ; no such file: the defaults
        dec ebx
        mov edi, BUF                ; size (BE32), select (BE16), reserved, name[56]
        mov ecx, 64
        call fw_read
        mov esi, BUF + 8
        mov edi, fw_name
        mov ecx, FW_NAME_LEN        ; with its NUL: the whole name
        repe cmpsb
        jne .entry
        mov ecx, [BUF]
        bswap ecx
        cmp ecx, 31
        ja .bad
        mov ax, [BUF + 4]
        xchg al, ah
        call fw_select
        mov edi, BUF
        push ecx
        call fw_read
        pop ecx
        mov byte [BUF + ecx], 0     ; QEMU's string= has no NUL
        mov esi, BUF
        call parse_uint
        jc .bad
        mov ebx, eax                ; W
        cmp byte [esi], ':'
        jne .bad
        inc esi
        call parse_uint
        jc .bad
        cmp byte [esi], 0
        jne .bad
        test ebx, ebx
        jz .bad
        cmp ebx, 65535
        ja .bad
        cmp eax, 1000000
        ja .bad
        mov [hot_w], ebx
        mov [hot_r], eax
        or dword [INFO + 0x30], 1
        ret
.bad:
        or dword [INFO + 0x30], 2
.none:
        ret

fw_select:                          ; ax = key
        mov dx, FW_SEL
        out dx, ax
        ret

fw_read:                            ; ecx bytes of the selected item to edi
        mov dx, FW_DATA
        rep insb
        ret

; eax = the decimal number at esi (1..7 digits), esi behind it; carry set if there is
; none or it is longer. Clobbers ecx, edx.
parse_uint:
        xor eax, eax
        xor ecx, ecx
.digit:
        movzx edx, byte [esi]
        sub edx, '0'
        cmp edx, 9
        ja .end
        imul eax, eax, 10
        add eax, edx
        inc esi
        inc ecx
        cmp ecx, 7
        jbe .digit
        stc
        ret
.end:
        cmp ecx, 1                  ; carry if no digit
        ret

; eax = TSC kHz: the median of three PIT calibrations (a vCPU preempted during one of
; them does not count); CAL_KHZ and flag 0x10 if the PIT never answered.
calibrate:
        call cal_once
        jc .fail
        push eax
        call cal_once
        jc .fail1
        push eax
        call cal_once
        jc .fail2
        mov ecx, eax
        pop ebx
        pop eax
        cmp eax, ebx                ; eax = min(a, b), ebx = max(a, b)
        jbe .s1
        xchg eax, ebx
.s1:
        cmp ebx, ecx                ; ebx = min(max(a, b), c)
        jbe .s2
        mov ebx, ecx
.s2:
        cmp eax, ebx                ; the median: the larger of the two
        jae .s3
        mov eax, ebx
.s3:
        mov ecx, 1193182            ; ticks * PIT Hz / (CAL_LATCH * 1000) = kHz
        mul ecx
        mov ecx, CAL_LATCH * 1000
        div ecx
        test eax, eax
        jz .fail
        ret
.fail2:
        pop eax
.fail1:
        pop eax
.fail:
        or dword [INFO + 0x30], 0x10
        mov eax, CAL_KHZ
        ret

; eax = TSC ticks of CAL_LATCH PIT cycles: channel 2 in mode 0, gated on through port
; 0x61, until OUT2 (bit 5 of 0x61) rises - the classic calibration (Linux's
; pit_calibrate_tsc). Carry set if it never rose. Clobbers ebx, ecx.
cal_once:
        in al, 0x61
        and al, 0xfd                ; speaker data off
        or al, 1                    ; channel 2 gate on
        out 0x61, al
        mov al, 0xb0                ; channel 2, lobyte/hibyte, mode 0, binary
        out 0x43, al
        mov al, CAL_LATCH & 0xff
        out 0x42, al
        mov al, CAL_LATCH >> 8
        out 0x42, al
        rdtsc
        mov ebx, eax
        mov ecx, CAL_POLLS
.poll:
        in al, 0x61
        test al, 0x20
        jnz .done
        dec ecx
        jnz .poll
        stc
        ret
.done:
        rdtsc
        sub eax, ebx
        clc
        ret

fw_name:
        db "opt/mtunnel/hot", 0
FW_NAME_LEN equ $ - fw_name

        align 8
h_deadline: dq 0                    ; TSC of the next page's write
h_last: dq 0                        ; TSC of the previous write
h_pstart: dq 0                      ; TSC of the previous pass's last write
h_cmax: dq 0                        ; longest gap of this pass, ticks
h_interval: dd 0                    ; ticks per page (0: unpaced)
h_slack: dd 0                       ; SLACK_MS in ticks
hot_w:  dd 0                        ; W, MiB
hot_r:  dd 0                        ; R, MiB/s
%endif

%ifdef EXTRA
        times (512 - ($ - $$) % 512) % 512 db 0
DSECTS  equ ($ - $$) / 512 - 1
%endif
