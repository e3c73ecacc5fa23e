; mtunnel lab guest: a boot sector that keeps dirtying memory (and, with -DDISK, its disk).
;
; Build: nasm -f bin -o guest.bin guest.asm            (lab.sh pads it into a raw disk image)
;        nasm -f bin -DIDLE -o guest-idle.bin guest.asm (writes the RAM pattern once, halts)
;        nasm -f bin -DDISK -o guest-disk.bin guest.asm (also writes its disk, see below;
;                                     1 KiB: pad it to a disk of more than 1 MiB, e.g. 32 MiB)
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

DELAY       equ 100000          ; TSC ticks between two pages
INFO        equ 0x500           ; status block (free memory after the BIOS data area)
MAGIC       equ 0x474c544d      ; "MTLG" as a little-endian dword
START       equ 0x100000        ; first page dirtied: 1 MiB
PAGE        equ 4096
%ifdef DISK
%ifdef IDLE
%error "DISK and IDLE do not combine"
%endif
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
%ifdef DISK
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

%ifdef DISK
        ; --- the disk code: sectors 1..DSECTS (CHS 0/0/2..) to 0x7e00, right behind us
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

%ifdef DISK
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

        times (512 - ($ - $$) % 512) % 512 db 0
DSECTS  equ ($ - $$) / 512 - 1
%endif
